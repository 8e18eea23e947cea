"""``global`` (and ``flops_budget``, the same search that must meet a budget): heads and neurons ranked
across layers."""

from __future__ import annotations

from edgeprune.compress.plan.base import PrunePlan, kept_count, register_allocation
from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.compress.plan.units import _head_units, _neuron_units, _normalise, _plan_from, _top_global, _Units
from edgeprune.core.arch.base import ArchAdapter, LayerShape
from edgeprune.core.errors import EdgePruneError


def _search(heads: _Units, neurons: _Units, mandatory_h: set[int], mandatory_n: set[int],
            budget: float) -> tuple[set[int], set[int]]:
    """Kwon et al.'s mask search: for every number of optional head units (best-first), fill the rest of
    the FLOPs budget with the best neurons; keep the split with the largest total kept score."""
    import numpy as np

    opt_h = sorted((u for u in range(len(heads.score)) if u not in mandatory_h), key=lambda u: (-heads.score[u], u))
    opt_n = sorted((u for u in range(len(neurons.score)) if u not in mandatory_n),
                   key=lambda u: (-neurons.score[u], u))
    base = sum(heads.cost[u] for u in mandatory_h) + sum(neurons.cost[u] for u in mandatory_n)
    h_cost = np.concatenate([[0.0], np.cumsum([heads.cost[u] for u in opt_h])])
    h_score = np.concatenate([[0.0], np.cumsum([heads.score[u] for u in opt_h])])
    n_cost = np.concatenate([[0.0], np.cumsum([neurons.cost[u] for u in opt_n])])
    n_score = np.concatenate([[0.0], np.cumsum([neurons.score[u] for u in opt_n])])
    remaining = budget - base - h_cost
    feasible = remaining >= 0
    if not feasible.any():
        raise EdgePruneError("the FLOPs budget is below the minimum of one head and one neuron per layer")
    n_fit = np.searchsorted(n_cost, np.where(feasible, remaining, -1.0), side="right") - 1
    total = np.where(feasible, h_score + n_score[np.clip(n_fit, 0, None)], -np.inf)
    k = int(np.argmax(total))
    return mandatory_h | set(opt_h[:k]), mandatory_n | set(opt_n[:int(n_fit[k])])


@register_allocation("global")
def global_allocation(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter,
                      config) -> PrunePlan:
    """Rank heads and neurons across layers. With ``flops_budget``: keep the best units that fit the
    budget (Kwon-style search over the head/neuron split); otherwise keep the global fractions
    ``1 - heads`` of head units and ``1 - ffn`` of neurons. Every layer keeps >= 1 head unit and neuron."""
    seq_len = cfg.seq_len
    heads, mand_h = _head_units(scores, shapes, cfg, adapter, config, seq_len)
    neurons, mand_n = _neuron_units(scores, shapes, adapter, config, seq_len)
    if not getattr(scores, "comparable", False):
        _normalise(heads, len(shapes))
        _normalise(neurons, len(shapes))
    mandatory_h = {u for m in mand_h for u in m}
    mandatory_n = {u for m in mand_n for u in m}
    dense_flops = sum(adapter.block_flops(config, s, seq_len) for s in adapter.dense_shapes(config))
    if cfg.flops_budget is not None:
        fixed = sum(adapter.block_flops(config, s, seq_len) for s in shapes) - sum(heads.cost) - sum(neurons.cost)
        budget = cfg.flops_budget * dense_flops - fixed
        kept_h, kept_n = _search(heads, neurons, mandatory_h, mandatory_n, budget)
    else:
        kept_h = _top_global(heads, mandatory_h, kept_count(len(heads.score), cfg.heads))
        kept_n = _top_global(neurons, mandatory_n, kept_count(len(neurons.score), cfg.ffn))
    plan = _plan_from(shapes, heads, kept_h, neurons, kept_n, cfg, adapter, config)
    kept_flops = sum(adapter.block_flops(config, s, seq_len) for s in plan.shapes)
    plan.meta.update({"dense_block_flops": dense_flops, "kept_block_flops": kept_flops,
                      "kept_flops_fraction": round(kept_flops / dense_flops, 6), "seq_len": seq_len})
    return plan


@register_allocation("flops_budget")
def flops_budget_allocation(scores, shapes, cfg: StructuredConfig, adapter: ArchAdapter, config) -> PrunePlan:
    """Global allocation that must meet ``flops_budget`` (the allocator ``--flops-budget`` selects)."""
    if cfg.flops_budget is None:
        raise EdgePruneError("allocation 'flops_budget' needs --flops-budget F")
    return global_allocation(scores, shapes, cfg, adapter, config)
