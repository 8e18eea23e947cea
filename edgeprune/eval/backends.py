"""The evaluation backends: the small embed / logits / encode (and zero-shot scoring) interface the metrics
read, over a PyTorch model (``TorchBackend``, the reference every variant is compared with) or an exported
model on a runtime (``RuntimeBackend``; ``runtime_backend`` picks llama.cpp's own for GGUF).

torch is imported only inside ``TorchBackend``: bench workers build runtime backends from this module and
must stay torch-free (edge devices have only the runtime install; ``tests/test_lean_import.py``).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from edgeprune.core.onnxio import mean_pool_normalize
from edgeprune.runtime.pipelines import (EmbeddingPipeline, ExportInfo, GenerationPipeline, load_session,
                                         position_limit)
from edgeprune.runtime.tokenizer import RuntimeTokenizer


def _inference_mode(method):
    """``torch.inference_mode()`` as a decorator that imports torch when called, not when this module loads."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return wrapper


class TorchBackend:
    """Wraps a loaded model with the small interface the metrics need: embed, logits, encode."""

    name = "pytorch"

    def __init__(self, loaded, max_length: int = 128, threads: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_length = max_length
        self.positions = position_limit(self.model.config.to_dict())
        if threads:
            import torch

            torch.set_num_threads(threads)

    @_inference_mode
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        outputs = self.model(**batch)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return mean_pool_normalize(hidden.float().numpy(), batch["attention_mask"].numpy())

    @_inference_mode
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return self.model(input_ids=ids, use_cache=False).logits.float().numpy()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- the zero-shot scorer's interface (edgeprune.eval.zeroshot) ---
    def encode_for_scoring(self, text: str) -> list[int]:
        # the tokenizer's default special tokens, as lm-eval's HFLM encodes
        return self.tokenizer.encode(text)

    @_inference_mode
    def batch_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of a right-padded batch (padded positions are garbage and never read)."""
        import torch

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()

    @_inference_mode
    def target_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
        """Logits [N, V] at (rows[i], positions[i]) of a right-padded batch: the LM head runs on those
        positions only (the full forward when the model's logits are not ``head(last hidden state)``)."""
        import torch

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        at = (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(positions, dtype=torch.long))
        split = self._head_split()
        if split is None:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[at].float().numpy()
        body, head = split
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        return head(hidden[at]).float().numpy()

    def _head_split(self):
        """(decoder body, LM head) when logits == head(body's last hidden state), checked once on a few
        tokens (a model that scales or soft-caps its logits fails the check and keeps the full forward)."""
        if not hasattr(self, "_split"):
            import torch

            self._split = None
            body = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
            head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
            if isinstance(body, torch.nn.Module) and body is not self.model and head is not None:
                ids = torch.arange(min(8, self.model.config.vocab_size), dtype=torch.long)[None, :]
                try:
                    full = self.model(input_ids=ids, use_cache=False).logits
                    split = head(body(input_ids=ids, use_cache=False)[0])
                except (TypeError, ValueError, AttributeError):
                    split = None
                if split is not None and split.shape == full.shape and torch.allclose(split, full, rtol=1e-4,
                                                                                       atol=1e-5):
                    self._split = (body, head)
        return self._split

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


class RuntimeBackend:
    """``edgeprune eval --runtime X``: embed / logits / encode through an exported model on a runtime."""

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime", max_length: int = 128,
                 threads: int | None = None):
        self.name = runtime
        self.max_length = max_length
        self.session = load_session(model_dir, runtime, threads)
        self.info = ExportInfo.read(model_dir, [i.name for i in self.session.inputs])
        self.tokenizer = RuntimeTokenizer(self.info.directory)
        self.positions = position_limit(self.info.config)
        self._embedder = None
        self._generator = None
        self.threads = threads
        self._head = None  # (headless session, SplitHead) once target_logits first runs; False: none

    @property
    def task(self) -> str:
        return self.info.task

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            self._embedder = EmbeddingPipeline(self.session, self.tokenizer, self.max_length)
        return self._embedder(list(texts))

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self._generation().logits(input_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # --- the zero-shot scorer's interface (edgeprune.eval.zeroshot) ---
    def _generation(self) -> GenerationPipeline:
        if self._generator is None:
            self._generator = GenerationPipeline(self.session, self.tokenizer, self.info)
        return self._generator

    def encode_for_scoring(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # the tokenizer's default special tokens, as lm-eval's HFLM

    def batch_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._generation().batch_logits(input_ids, attention_mask)

    def target_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
        """Logits [N, V] at (rows[i], positions[i]): onnxruntime runs the export's graph up to the final
        hidden states and the LM head is applied at those positions only (edgeprune.runtime.lm_head): in numpy
        for a float MatMul head, in a one-node session for a weight-only ``MatMulNBits`` head; any other head,
        or another runtime, takes the full logits."""
        generation = self._generation()
        split = self._split_head()
        if split is None:
            return generation.batch_logits(input_ids, attention_mask)[rows, positions]
        session, split, head = split
        hidden = generation.run_batch(session, np.asarray(input_ids, dtype=np.int64),
                                      np.asarray(attention_mask, dtype=np.int64), split.hidden)
        picked = np.ascontiguousarray(hidden[rows, positions])
        if head is not None:  # a weight-only quantized head: its own kernel, on the picked rows only
            return head.run({split.hidden: picked}, ["logits"])["logits"]
        logits = picked @ split.weight
        return logits + split.bias if split.bias is not None else logits

    def _split_head(self):
        if self._head is None:
            self._head = False
            if self.name == "onnxruntime":
                from edgeprune.runtime.lm_head import load_head_session, load_hidden_session, split_lm_head

                split = split_lm_head(self.session.path)
                if split is not None:
                    session = load_hidden_session(split, self.name, self.threads)
                    head = load_head_session(split, self.name, self.threads) if split.head_model is not None else None
                    # the weights now live in the sessions; keep only the head's numpy arrays
                    self._head = (session, type(split)(None, split.hidden, split.weight, split.bias), head)
        return self._head or None

    @property
    def max_positions(self) -> int | None:
        return self.info.config.get("max_position_embeddings")

    @property
    def prefix_token_id(self) -> int | None:
        bos = self.tokenizer.token_id("bos_token")
        return bos if bos is not None else self.tokenizer.token_id("eos_token")

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_id or 0)

    def close(self) -> None:
        self.session.close()
        if self._head:
            for session in (self._head[0], self._head[2]):
                if session is not None:
                    session.close()


def runtime_backend(model: str | os.PathLike, runtime: str = "onnxruntime", max_length: int = 128,
                    threads: int | None = None):
    """The eval backend for ``runtime``: ``RuntimeBackend`` for the ONNX runtimes, llama.cpp's own for GGUF."""
    if runtime == "llamacpp":
        from edgeprune.runtime.llamacpp_adapter import LlamaCppBackend

        return LlamaCppBackend(model, max_length=max_length, threads=threads)
    return RuntimeBackend(model, runtime, max_length=max_length, threads=threads)
