"""What structured pruning is asked to do (``StructuredConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError

GQA_MODES = ("within", "groups")


@dataclass(frozen=True)
class StructuredConfig(FrozenConfig):
    """Structured pruning: fractions of attention heads and FFN neurons to remove."""

    heads: float = 0.0
    ffn: float = 0.0
    importance: str = "magnitude"
    allocation: str = "uniform"
    round_to: int = 1
    # GQA: "within" drops the same number of query heads in every KV group; "groups" drops whole groups.
    gqa_mode: str = "within"
    flops_budget: float | None = None  # keep at most this fraction of dense block FLOPs (global allocation)
    seq_len: int = 128  # sequence length the FLOPs budget is counted at
    # Kwon et al.'s mask rearrangement: keep each layer's unit counts, re-choose which units by the layer's
    # full Fisher block (joint removal cost) instead of single-unit scores. Needs importance "fisher".
    rearrange: bool = False
    # Runtime-priced search (allocation "joint"): a cost model measured on the target runtime
    # (`edgeprune cost measure`, a JSON file) prices each head unit and neuron by the decode time it costs
    # there instead of its FLOPs, and the search stops when the predicted speedups over the dense model are
    # reached (and the FLOPs budget, if one is given, holds).
    cost_model: str | None = None
    decode_speedup: float | None = None
    prefill_speedup: float | None = None

    def __post_init__(self):
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise EdgePruneError(f"--{name} must be in [0, 1): the fraction to remove (got {value})")
        if self.round_to < 1:
            raise EdgePruneError(f"--round-to must be a positive integer (got {self.round_to})")
        if self.seq_len < 1:
            raise EdgePruneError(f"--seq-len must be >= 1 (got {self.seq_len})")
        if self.gqa_mode not in GQA_MODES:
            raise EdgePruneError(f"gqa_mode must be one of {', '.join(GQA_MODES)} (got {self.gqa_mode!r})")
        if self.flops_budget is not None and not 0.0 < self.flops_budget <= 1.0:
            raise EdgePruneError(f"--flops-budget must be in (0, 1] (got {self.flops_budget})")
        for name in ("decode_speedup", "prefill_speedup"):
            value = getattr(self, name)
            if value is not None and not 1.0 < value < 100.0:
                raise EdgePruneError(f"--{name.replace('_', '-')} must be > 1 (a speedup over dense; got {value})")
        targets = self.decode_speedup is not None or self.prefill_speedup is not None
        if targets and self.cost_model is None:
            raise EdgePruneError("--decode-speedup/--prefill-speedup are predicted by a measured cost model: pass "
                                 "--cost-model FILE (edgeprune cost measure --model DENSE.gguf)")
        if self.cost_model is not None and not targets:
            raise EdgePruneError("--cost-model prices the search; say what to reach: --decode-speedup X and/or "
                                 "--prefill-speedup Y")
        if self.cost_model is not None and self.allocation != "joint":
            raise EdgePruneError(f"--cost-model prices the joint search: use --allocation joint (got {self.allocation!r})")
        if self.allocation == "joint" and self.flops_budget is None and self.heads == 0 and self.ffn == 0 \
                and not targets:
            # without a budget nothing would be pruned and the request would pass silently
            raise EdgePruneError("allocation 'joint' needs --flops-budget F (or --heads/--ffn fractions, which set "
                                 "the budget to the block FLOPs their uniform cut keeps)")

    @property
    def active(self) -> bool:
        return self.heads > 0 or self.ffn > 0 or self.flops_budget is not None or self.cost_model is not None
