"""The PyTorch evaluation backend: the reference every exported/runtime variant is compared with."""

from __future__ import annotations

import numpy as np
import torch

from edgeprune.core.onnxio import mean_pool_normalize


class TorchBackend:
    """Wraps a loaded model with the small interface the metrics need: embed, logits, encode."""

    name = "pytorch"

    def __init__(self, loaded, max_length: int = 128, threads: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_length = max_length
        from edgeprune.runtime.pipelines import position_limit

        self.positions = position_limit(self.model.config.to_dict())
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        outputs = self.model(**batch)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return mean_pool_normalize(hidden.float().numpy(), batch["attention_mask"].numpy())

    @torch.inference_mode()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return self.model(input_ids=ids, use_cache=False).logits.float().numpy()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- the zero-shot scorer's interface (edgeprune.eval.zeroshot) ---
    def encode_for_scoring(self, text: str) -> list[int]:
        # the tokenizer's default special tokens, as lm-eval's HFLM encodes
        return self.tokenizer.encode(text)

    @torch.inference_mode()
    def batch_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of a right-padded batch (padded positions are garbage and never read)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def prefix_token_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0
