"""ORT transformer graph fusion (attention, LayerNorm, GELU...) for pruned models.

Head counts differ per layer after pruning, so the optimizer is told ``num_heads=0, hidden_size=0``: it then
reads them from each attention subgraph's reshape shapes instead of assuming one global value. It matches the
attention pattern on the ``Shape -> Gather -> Concat -> Reshape`` chains torch.onnx emits, so the export runs it
before shape folding (on a folded graph it fused 0 Attention nodes) and folds what is left afterwards.
The residual ``Add + LayerNormalization`` is not fused into ``SkipLayerNormalization``: that CPU kernel took
~113 us per node against ~16 us unfused here (docs/runtime.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.logs import quiet_logs

# edgeprune task family -> ORT optimizer model type. Decoders use the GPT-2 fusions (LayerNorm, GELU,
# skip-layernorm; attention only where the pattern matches); the result is validated either way.
MODEL_TYPES = {"encoder": "bert", "decoder": "gpt2"}


def optimize(src: Path, dst: Path, decoder: bool, quantized: bool = False) -> dict[str, Any]:
    """Fuse ``src`` into ``dst``; returns the fused-operator counts. ``quantized``: the file is quantized next,
    so the embeddings stay unfused: ``EmbedLayerNormalization`` keeps its tables fp32 (MiniLM INT8 55.0 MB
    with it, 16.3 MB without), while a plain ``Gather`` is quantized."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from edgeprune.core.onnxio import needs_external_data

    model_type = MODEL_TYPES["decoder" if decoder else "encoder"]
    options = FusionOptions(model_type)
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    options.enable_embed_layer_norm = not quantized
    # The fusions warn that pruned q/k/v widths differ from the hidden size; that is expected here (the fused
    # Attention takes explicit widths) and the result is validated, so the warnings are only noise.
    try:
        with quiet_logs("", "onnxruntime", "onnxruntime.transformers"):
            optimized = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                       optimization_options=options)
    except Exception as exc:  # the optimizer raises bare AssertionErrors on patterns it cannot handle
        raise EdgePruneError(f"graph optimisation failed ({model_type}): {exc.__class__.__name__}: {exc}") from None
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(dst), use_external_data_format=needs_external_data(optimized.model))
    return {"model_type": model_type, "fused_operators": fused}
