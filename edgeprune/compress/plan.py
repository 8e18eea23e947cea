"""Prune plans: which heads, KV heads and FFN neurons each layer keeps, and the allocators that make them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgeprune.compress.adapters.base import ArchAdapter, LayerPlan, LayerShape
from edgeprune.configs import FrozenConfig
from edgeprune.errors import EdgePruneError

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
        if self.allocation == "joint" and self.flops_budget is None and self.heads == 0 and self.ffn == 0:
            # without a budget nothing would be pruned and the request would pass silently
            raise EdgePruneError("allocation 'joint' needs --flops-budget F (or --heads/--ffn fractions, which set "
                                 "the budget to the block FLOPs their uniform cut keeps)")

    @property
    def active(self) -> bool:
        return self.heads > 0 or self.ffn > 0 or self.flops_budget is not None


@dataclass
class PrunePlan:
    """Width (``layers``: what every dense layer keeps) and, optionally, depth (``depth``: blocks and
    sublayers removed afterwards, by dense index; edgeprune/compress/depth.py)."""

    layers: list[LayerPlan]
    dense: list[LayerShape]
    meta: dict = field(default_factory=dict)
    depth: "DepthPlan | None" = None

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    @classmethod
    def identity(cls, dense: list[LayerShape]) -> "PrunePlan":
        """A width plan that keeps everything (for a depth-only plan)."""
        return cls([LayerPlan(tuple(range(s.heads)), tuple(range(s.kv_heads)), tuple(range(s.ffn))) for s in dense],
                   list(dense), {"width": "none"})

    def to_dict(self) -> dict:
        out = {
            "meta": self.meta,
            "dense": [s.to_dict() for s in self.dense],
            "kept": [s.to_dict() for s in self.shapes],
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.depth is not None:
            out["depth"] = self.depth.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        from edgeprune.compress.depth import DepthPlan

        depth = DepthPlan.from_dict(data["depth"]) if data.get("depth") else None
        return cls([LayerPlan.from_dict(d) for d in data["layers"]], [LayerShape(**d) for d in data["dense"]],
                   data.get("meta", {}), depth)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PrunePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def kept_count(total: int, fraction: float, round_to: int = 1, unit_width: int = 1) -> int:
    """Units kept after removing ``fraction`` of ``total``: at least one, width a multiple of ``round_to``."""
    keep = max(1, total - int(math.floor(fraction * total + 0.5)))
    if round_to > 1:
        step = round_to // math.gcd(round_to, unit_width)
        if total >= step:
            keep = min(total - total % step, max(step, int(math.floor(keep / step + 0.5)) * step))
    return keep


def budget_for_fractions(shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter, config) -> float:
    """The block-FLOPs fraction (at ``cfg.seq_len``) that removing ``cfg.heads`` of every layer's heads and
    ``cfg.ffn`` of its neurons keeps: how a budget allocator reads ``--heads/--ffn`` given without a budget."""
    def kept(shape: LayerShape) -> LayerShape:
        heads = kept_count(shape.heads, cfg.heads)
        kv = kept_count(shape.kv_heads, cfg.heads) if cfg.gqa_mode == "groups" else shape.kv_heads
        return LayerShape(heads=heads, kv_heads=min(kv, heads), ffn=kept_count(shape.ffn, cfg.ffn))

    dense = sum(adapter.block_flops(config, s, cfg.seq_len) for s in shapes)
    return round(sum(adapter.block_flops(config, kept(s), cfg.seq_len) for s in shapes) / dense, 4)


def top_sorted(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the k highest scores, in ascending index order (stable ties: lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:k]))


def heads_for_layer(shape: LayerShape, head_scores: torch.Tensor, kv_scores: torch.Tensor, keep_heads: int,
                    gqa_mode: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Choose query and KV heads to keep so the layer stays a valid (G)QA layer with ~keep_heads heads."""
    if shape.kv_heads == shape.heads:
        kept = top_sorted(head_scores, keep_heads)
        return kept, kept
    group = shape.heads // shape.kv_heads
    if gqa_mode == "groups":
        n_groups = max(1, min(shape.kv_heads, int(math.floor(keep_heads / group + 0.5))))
        group_scores = head_scores.view(shape.kv_heads, group).sum(1) + kv_scores
        kv = top_sorted(group_scores, n_groups)
        return tuple(g * group + j for g in kv for j in range(group)), kv
    per_group = max(1, min(group, int(math.floor(keep_heads / shape.kv_heads + 0.5))))
    heads = []
    for g in range(shape.kv_heads):
        heads.extend(g * group + j for j in top_sorted(head_scores[g * group:(g + 1) * group], per_group))
    return tuple(heads), tuple(range(shape.kv_heads))


def uniform_allocation(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter,
                       config) -> PrunePlan:
    """The same fraction in every layer; units ranked within their layer."""
    head_dim = adapter.head_dim(config)
    layers = []
    for i, shape in enumerate(shapes):
        keep_heads = kept_count(shape.heads, cfg.heads, cfg.round_to, head_dim)
        heads, kv = heads_for_layer(shape, scores.heads[i], scores.kv_heads[i], keep_heads, cfg.gqa_mode)
        neurons = top_sorted(scores.neurons[i], kept_count(shape.ffn, cfg.ffn, cfg.round_to))
        layers.append(LayerPlan(heads, kv, neurons))
    return PrunePlan(layers, list(shapes))


_ALLOCATORS: dict[str, Callable[..., PrunePlan]] = {"uniform": uniform_allocation}


def register_allocation(name: str):
    def decorator(fn):
        _ALLOCATORS[name] = fn
        return fn
    return decorator


def get_allocation(name: str) -> Callable[..., PrunePlan]:
    try:
        return _ALLOCATORS[name]
    except KeyError:
        raise EdgePruneError(f"unknown allocation {name!r}; available: {', '.join(sorted(_ALLOCATORS))}") from None


# --- global allocation ---------------------------------------------------------------------------------
@dataclass
class _Units:
    """Removable units of one kind across all layers: their layer, score and FLOPs cost."""

    layer: list[int]
    member: list[tuple[int, ...]]  # query-head indices (heads) or (neuron,) of each unit
    score: list[float]
    cost: list[float]


def _head_units(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter, config,
                seq_len: int) -> tuple[_Units, list[list[int]]]:
    """Head units per layer, ordered best-first within the layer. Without GQA a unit is one head; with
    GQA it is a whole KV group ("groups") or one rank slot taking one query head from every group
    ("within"), so any number of kept units is a valid (G)QA layer. The best unit per layer is mandatory."""
    units = _Units([], [], [], [])
    mandatory: list[list[int]] = []
    for i, shape in enumerate(shapes):
        head_scores = scores.heads[i].float()
        if shape.kv_heads == shape.heads:
            members = [(h,) for h in range(shape.heads)]
            values = [float(head_scores[h]) for h in range(shape.heads)]
            full = LayerShape(shape.heads, shape.kv_heads, shape.ffn)
            unit_cost = adapter.block_flops(config, full, seq_len) - adapter.block_flops(
                config, LayerShape(shape.heads - 1, shape.kv_heads - 1, shape.ffn), seq_len)
        elif cfg.gqa_mode == "groups":
            group = shape.heads // shape.kv_heads
            members = [tuple(range(g * group, (g + 1) * group)) for g in range(shape.kv_heads)]
            values = [float(head_scores[list(m)].sum() + scores.kv_heads[i][g]) for g, m in enumerate(members)]
            unit_cost = adapter.block_flops(config, shape, seq_len) - adapter.block_flops(
                config, LayerShape(shape.heads - group, shape.kv_heads - 1, shape.ffn), seq_len)
        else:
            group = shape.heads // shape.kv_heads
            ranked = [sorted(range(g * group, (g + 1) * group), key=lambda h: (-float(head_scores[h]), h))
                      for g in range(shape.kv_heads)]
            members = [tuple(r[slot] for r in ranked) for slot in range(group)]
            values = [float(head_scores[list(m)].sum()) for m in members]
            unit_cost = adapter.block_flops(config, shape, seq_len) - adapter.block_flops(
                config, LayerShape(shape.heads - shape.kv_heads, shape.kv_heads, shape.ffn), seq_len)
        order = sorted(range(len(members)), key=lambda u: (-values[u], u))
        layer_units = []
        for u in order:
            layer_units.append(len(units.layer))
            units.layer.append(i)
            units.member.append(members[u])
            units.score.append(values[u])
            units.cost.append(float(unit_cost))
        mandatory.append(layer_units[:1])
    return units, mandatory


def _neuron_units(scores, shapes, adapter: ArchAdapter, config, seq_len: int) -> tuple[_Units, list[list[int]]]:
    units = _Units([], [], [], [])
    mandatory = []
    for i, shape in enumerate(shapes):
        cost = adapter.block_flops(config, shape, seq_len) - adapter.block_flops(
            config, LayerShape(shape.heads, shape.kv_heads, shape.ffn - 1), seq_len)
        values = scores.neurons[i].float()
        order = sorted(range(shape.ffn), key=lambda n: (-float(values[n]), n))
        first = len(units.layer)
        for n in order:
            units.layer.append(i)
            units.member.append((n,))
            units.score.append(float(values[n]))
            units.cost.append(float(cost))
        mandatory.append([first])
    return units, mandatory


def _normalise(units: _Units, n_layers: int) -> None:
    """Scores that are not comparable across layers: make each layer's units worth their FLOPs on
    average (score / layer mean * cost), so ranking is by relative importance per FLOP."""
    for i in range(n_layers):
        idx = [u for u, layer in enumerate(units.layer) if layer == i]
        mean = sum(units.score[u] for u in idx) / max(len(idx), 1)
        for u in idx:
            units.score[u] = units.score[u] / mean * units.cost[u] if mean > 0 else units.cost[u]


def _plan_from(shapes, heads: _Units, kept_heads: set[int], neurons: _Units, kept_neurons: set[int],
               cfg: StructuredConfig, adapter: ArchAdapter, config) -> PrunePlan:
    layers = []
    for i, shape in enumerate(shapes):
        q = sorted(h for u in kept_heads if heads.layer[u] == i for h in heads.member[u])
        if shape.kv_heads == shape.heads:
            kv = list(q)
        elif cfg.gqa_mode == "groups":
            group = shape.heads // shape.kv_heads
            kv = sorted({h // group for h in q})
        else:
            kv = list(range(shape.kv_heads))
        n_scored = sorted((u for u in kept_neurons if neurons.layer[u] == i), key=lambda u: -neurons.score[u])
        count = len(n_scored)
        if cfg.round_to > 1 and count >= cfg.round_to:
            count -= count % cfg.round_to  # round down, so the budget still holds
        keep_n = sorted(neurons.member[u][0] for u in n_scored[:max(count, 1)])
        layers.append(LayerPlan(tuple(q), tuple(kv), tuple(keep_n)))
    return PrunePlan(layers, list(shapes))


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


def _top_global(units: _Units, mandatory: set[int], keep: int) -> set[int]:
    rest = sorted((u for u in range(len(units.score)) if u not in mandatory), key=lambda u: (-units.score[u], u))
    return mandatory | set(rest[:max(0, keep - len(mandatory))])


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


# --- mask rearrangement ----------------------------------------------------------------------------------
def _jointly_cheapest_removal(interactions: torch.Tensor, keep: int) -> tuple[int, ...]:
    """Units to keep when removing ``n - keep`` of them greedily by the quadratic removal cost
    ``(1-m)^T F (1-m)``: each step removes the unit whose removal adds the least, counting its interactions
    with the units already removed (F's diagonal alone would be the single-unit scores)."""
    size = interactions.shape[0]
    fisher = interactions.double()
    removed = torch.zeros(size, dtype=torch.bool)
    shared = torch.zeros(size, dtype=torch.float64)  # sum over removed units v of F[u, v]
    diagonal = fisher.diagonal()
    for _ in range(size - keep):
        cost = diagonal + 2 * shared
        cost[removed] = float("inf")
        unit = int(torch.argmin(cost))
        removed[unit] = True
        shared += fisher[:, unit]
    return tuple(int(u) for u in torch.nonzero(~removed).flatten())


def _kv_group_block(head_block: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """A layer's Fisher block over KV groups from its block over query heads: a group's mask moves all its
    heads at once, so its entries are sums over member heads (M^T F M with M the membership matrix)."""
    group = shape.heads // shape.kv_heads
    membership = torch.zeros(shape.heads, shape.kv_heads, dtype=head_block.dtype)
    membership[torch.arange(shape.heads), torch.arange(shape.heads) // group] = 1
    return membership.T @ head_block @ membership


def rearrange_plan(plan: PrunePlan, scores, cfg: StructuredConfig) -> PrunePlan:
    """Kwon et al. 2022's mask rearrangement: the allocator fixed how many heads and neurons each layer
    keeps; re-choose which ones from the layer's full Fisher block. With GQA "groups" a unit is a KV group
    (its block is summed over member heads); with "within" only the neurons are rearranged."""
    if scores.head_interactions is None or scores.neuron_interactions is None:
        raise EdgePruneError("mask rearrangement needs an importance with unit interactions (--importance fisher)")
    layers, changed = [], []
    for i, (layer, dense) in enumerate(zip(plan.layers, plan.dense)):
        heads, kv = layer.keep_heads, layer.keep_kv_heads
        head_block = scores.head_interactions[i]
        if dense.kv_heads == dense.heads:
            heads = kv = _jointly_cheapest_removal(head_block, len(layer.keep_heads))
        elif cfg.gqa_mode == "groups":
            group = dense.heads // dense.kv_heads
            kv = _jointly_cheapest_removal(_kv_group_block(head_block, dense), len(layer.keep_kv_heads))
            heads = tuple(g * group + j for g in kv for j in range(group))
        neurons = _jointly_cheapest_removal(scores.neuron_interactions[i], len(layer.keep_neurons))
        new = LayerPlan(tuple(heads), tuple(kv), tuple(neurons))
        changed.append([len(set(layer.keep_heads) - set(new.keep_heads)),
                        len(set(layer.keep_neurons) - set(new.keep_neurons))])
        layers.append(new)
    meta = dict(plan.meta, rearranged_heads_neurons=changed)
    return PrunePlan(layers, list(plan.dense), meta)


# --- joint (block-Fisher) allocation --------------------------------------------------------------------
ALLOCATIONS_NEEDING_INTERACTIONS = {"joint"}


@dataclass
class _Block:
    """One layer's removable heads (or KV groups) or neurons, with their Fisher block."""

    layer: int
    kind: str  # "heads" | "neurons"
    fisher: torch.Tensor  # [units, units], float64
    cost: float  # block FLOPs of one unit
    removed: torch.Tensor  # bool [units]
    marginal: torch.Tensor  # loss added by removing each unit now: F_uu + 2 sum_{v removed} F_uv

    def cheapest(self) -> tuple[float, int]:
        """(added loss per FLOP, unit) of the best next removal; inf when only one unit is left."""
        if int((~self.removed).sum()) <= 1:
            return float("inf"), -1
        values = self.marginal.masked_fill(self.removed, float("inf"))
        unit = int(torch.argmin(values))
        return float(values[unit]) / self.cost, unit

    def remove(self, unit: int) -> None:
        self.removed[unit] = True
        self.marginal += 2 * self.fisher[:, unit]

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(int(u) for u in torch.nonzero(~self.removed).flatten())


def _joint_blocks(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter, config) -> list[_Block]:
    blocks = []
    for i, shape in enumerate(shapes):
        head_block = scores.head_interactions[i].double()
        if shape.kv_heads == shape.heads:
            removed_shape = LayerShape(shape.heads - 1, shape.kv_heads - 1, shape.ffn)
        elif cfg.gqa_mode == "groups":
            group = shape.heads // shape.kv_heads
            head_block = _kv_group_block(head_block, shape)
            removed_shape = LayerShape(shape.heads - group, shape.kv_heads - 1, shape.ffn)
        else:
            raise EdgePruneError("allocation 'joint' prunes GQA models by whole KV groups: use --gqa-mode groups")
        full = adapter.block_flops(config, shape, cfg.seq_len)
        neuron_block = scores.neuron_interactions[i].double()
        for kind, fisher, smaller in (("heads", head_block, removed_shape),
                                      ("neurons", neuron_block, LayerShape(shape.heads, shape.kv_heads, shape.ffn - 1))):
            blocks.append(_Block(i, kind, fisher, float(full - adapter.block_flops(config, smaller, cfg.seq_len)),
                                 torch.zeros(fisher.shape[0], dtype=torch.bool), fisher.diagonal().clone()))
    return blocks


@register_allocation("joint")
def joint_allocation(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter,
                     config) -> PrunePlan:
    """Greedy search under the FLOPs budget on each layer's full Fisher block (Kwon et al.'s block-diagonal
    approximation, used for the search itself rather than only to rearrange its result): repeatedly remove
    the unit that adds the least loss per FLOP, counting its interactions with the units already removed
    from its layer. Needs ``--flops-budget`` (StructuredConfig enforces it) and an importance with interactions
    (fisher). ``round_to`` then removes each layer's next-cheapest neurons down to a multiple (the budget
    still holds)."""
    if scores.head_interactions is None or scores.neuron_interactions is None:
        raise EdgePruneError("allocation 'joint' needs an importance with unit interactions (--importance fisher)")
    seq_len = cfg.seq_len
    dense_flops = sum(adapter.block_flops(config, s, seq_len) for s in adapter.dense_shapes(config))
    kept_flops = sum(adapter.block_flops(config, s, seq_len) for s in shapes)
    blocks = _joint_blocks(scores, shapes, cfg, adapter, config)
    best = [b.cheapest() for b in blocks]
    budget = cfg.flops_budget * dense_flops
    while kept_flops > budget:
        k = min(range(len(blocks)), key=lambda j: best[j][0])
        if best[k][0] == float("inf"):
            raise EdgePruneError("the FLOPs budget is below the minimum of one head and one neuron per layer")
        blocks[k].remove(best[k][1])
        kept_flops -= blocks[k].cost
        best[k] = blocks[k].cheapest()
    if cfg.round_to > 1:
        for block in blocks:
            if block.kind == "neurons":
                while len(block.kept) % cfg.round_to and len(block.kept) > cfg.round_to:
                    block.remove(block.cheapest()[1])
    layers = []
    for i, shape in enumerate(shapes):
        heads, neurons = blocks[2 * i].kept, blocks[2 * i + 1].kept
        if shape.kv_heads == shape.heads:
            layers.append(LayerPlan(heads, heads, neurons))
        else:
            group = shape.heads // shape.kv_heads
            layers.append(LayerPlan(tuple(g * group + j for g in heads for j in range(group)), heads, neurons))
    plan = PrunePlan(layers, list(shapes))
    kept = sum(adapter.block_flops(config, s, seq_len) for s in plan.shapes)
    plan.meta.update({"dense_block_flops": dense_flops, "kept_block_flops": kept,
                      "kept_flops_fraction": round(kept / dense_flops, 6), "seq_len": seq_len})
    return plan
