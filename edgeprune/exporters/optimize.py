"""ORT transformer graph fusion (attention, LayerNorm, GELU...) for pruned models.

Head counts differ per layer after pruning, so the optimizer is told ``num_heads=0, hidden_size=0``: it then
reads them from each attention subgraph's reshape shapes instead of assuming one global value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.logs import quiet_logs

# edgeprune task family -> ORT optimizer model type. Decoders use the GPT-2 fusions (LayerNorm, GELU,
# skip-layernorm; attention only where the pattern matches); the result is validated either way.
MODEL_TYPES = {"encoder": "bert", "decoder": "gpt2"}


def optimize(src: Path, dst: Path, decoder: bool) -> dict[str, Any]:
    """Fuse ``src`` into ``dst``; returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES["decoder" if decoder else "encoder"]
    # The fusions warn that pruned q/k/v widths differ from the hidden size; that is expected here (the fused
    # Attention takes explicit widths) and the result is validated, so the warnings are only noise.
    try:
        with quiet_logs("", "onnxruntime", "onnxruntime.transformers"):
            optimized = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
    except Exception as exc:  # the optimizer raises bare AssertionErrors on patterns it cannot handle
        raise EdgePruneError(f"graph optimisation failed ({model_type}): {exc.__class__.__name__}: {exc}") from None
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(dst))
    return {"model_type": model_type, "fused_operators": fused}
