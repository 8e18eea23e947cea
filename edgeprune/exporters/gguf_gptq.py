"""GPTQ for ``--target llamacpp``: the Hessian of every Linear's input, gathered through the PyTorch model on
calibration windows, then each weight rounded onto llama.cpp's own block grid (q4_0, q4_1, q5_0, q5_1, q8_0)
by error-compensated rounding (``exporters/gptq.py``), and packed as ggml blocks.

The gguf package's quantizer (what ``rtn`` writes) rounds every weight to its nearest grid point; GPTQ spreads
each rounding error over the input channels not yet rounded, weighted by how the calibration activations
correlate, so the layer's output moves less. The Hessians come from the fp32 model in one pass (not layer by
layer from the already quantized model), as the ONNX int4 export does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeprune.exporters import gptq

GPTQ_TYPES = tuple(gptq.GGML_GRIDS)
CALIBRATION_BATCH = 8  # windows per forward pass


def linear_hessians(model, windows: np.ndarray, progress: bool = True,
                    lm_head: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """``sum x x^T`` (float32, [in, in]) of the input of every ``torch.nn.Linear`` of ``model`` over the token
    windows [count, length], keyed by the weight's parameter name; and the number of tokens. Linears that read
    the same tensor (q/k/v, gate/up) share one Hessian, computed once. ``lm_head``: the LM head's too (under
    the embedding table's name as well when the two are tied); else its logits (~20 % of the forward) are
    never computed."""
    import torch
    from tqdm.auto import tqdm

    sums: dict[str, Any] = {}
    owner_of: dict[str, str] = {}
    last: dict[str, Any] = {"input": None, "owner": None}

    def hook(name: str):
        def accumulate(module, args):
            x = args[0]
            if x is last["input"]:  # the same tensor as the Linear just before: the same Hessian
                owner_of[name] = last["owner"]
                return
            last["input"], last["owner"] = x, name
            owner_of[name] = name
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            gram = rows.T @ rows
            sums[name] = sums[name] + gram if name in sums else gram
        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    device = next(model.parameters()).device
    body = model if lm_head or not hasattr(model, "base_model") else model.base_model
    try:
        with torch.inference_mode():
            starts = range(0, len(windows), CALIBRATION_BATCH)
            for start in tqdm(starts, desc="GPTQ calibration", unit="batch", disable=not progress, leave=False):
                batch = torch.as_tensor(windows[start:start + CALIBRATION_BATCH], device=device)
                body(input_ids=batch, use_cache=False)
                last["input"] = last["owner"] = None  # never hold a batch's activations past its forward
    finally:
        for handle in handles:
            handle.remove()
    arrays = {owner: gram.cpu().numpy() for owner, gram in sums.items()}
    hessians = {f"{name}.weight": arrays[owner] for name, owner in owner_of.items()}
    if not lm_head:
        hessians.pop("lm_head.weight", None)
    elif getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in hessians:
        hessians["model.embed_tokens.weight"] = hessians["lm_head.weight"]  # what the GGUF file writes
    return hessians, int(windows.size)


@dataclass
class GGUFGPTQ:
    """The tensor quantizer ``core.ggufio.write_gguf`` calls: GPTQ for every tensor with a Hessian whose GGUF
    type has a GPTQ grid (None for the rest, which the gguf package rounds to nearest)."""

    hessians: dict[str, np.ndarray]
    tokens: int
    source: str
    damp: float = 0.01
    quantized: list[str] = field(default_factory=list)

    def __call__(self, hf_name: str, data: np.ndarray, ttype: str) -> np.ndarray | None:
        hessian = self.hessians.get(hf_name)
        if hessian is None or ttype not in GPTQ_TYPES or data.ndim != 2 or data.shape[1] % gptq.GGML_BLOCK:
            return None
        # data is [out, in] (HF layout, Q/K rows already in llama.cpp's order): GPTQ's weight is [K=in, N=out]
        codes, scales, zeros = gptq.gptq_quantize(data.T, hessian, gptq.ggml_settings(ttype, damp=self.damp))
        self.quantized.append(hf_name)
        return gptq.pack_ggml_blocks(codes, scales, zeros, ttype)

    def record(self) -> dict[str, Any]:
        return {"algorithm": "gptq", "tensors": len(self.quantized), "calibration": self.source,
                "calibration_tokens": self.tokens, "damp": self.damp, "clip_search": True}
