"""Removable units: a head unit (one head; with GQA a whole KV group, or one rank slot across every group)
and FFN neurons, with their scores and FLOPs costs. Shared by the allocators."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeprune.compress.plan.base import PrunePlan, top_sorted
from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.core.arch.base import ArchAdapter, LayerPlan, LayerShape


@dataclass(frozen=True)
class HeadUnits:
    """How one layer's attention is pruned in units, the one place that knows GQA: without GQA ("mha") a
    unit is one head; with GQA "groups" a unit is a KV group with its query heads; with "within" the KV
    heads stay and a unit is one query head per group."""

    shape: LayerShape
    mode: str  # "mha" | "groups" | "within"

    @classmethod
    def of(cls, shape: LayerShape, gqa_mode: str) -> "HeadUnits":
        return cls(shape, "mha" if shape.kv_heads == shape.heads else gqa_mode)

    @property
    def group(self) -> int:
        return self.shape.heads // self.shape.kv_heads

    def without_one(self) -> LayerShape:
        """The layer's shape after removing one unit (what the unit's FLOPs cost is counted against)."""
        s = self.shape
        if self.mode == "mha":
            return LayerShape(s.heads - 1, s.kv_heads - 1, s.ffn)
        if self.mode == "groups":
            return LayerShape(s.heads - self.group, s.kv_heads - 1, s.ffn)
        return LayerShape(s.heads - s.kv_heads, s.kv_heads, s.ffn)

    def group_heads(self, kv: tuple[int, ...]) -> tuple[int, ...]:
        """The query heads of the given KV groups."""
        return tuple(g * self.group + j for g in kv for j in range(self.group))

    def kv_for(self, heads) -> tuple[int, ...]:
        """The KV heads that serve the kept query heads."""
        if self.mode == "mha":
            return tuple(heads)
        if self.mode == "groups":
            return tuple(sorted({h // self.group for h in heads}))
        return tuple(range(self.shape.kv_heads))


def heads_for_layer(shape: LayerShape, head_scores: torch.Tensor, kv_scores: torch.Tensor, keep_heads: int,
                    gqa_mode: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Choose query and KV heads to keep so the layer stays a valid (G)QA layer with ~keep_heads heads."""
    units = HeadUnits.of(shape, gqa_mode)
    if units.mode == "mha":
        kept = top_sorted(head_scores, keep_heads)
        return kept, kept
    group = units.group
    if units.mode == "groups":
        n_groups = max(1, min(shape.kv_heads, int(math.floor(keep_heads / group + 0.5))))
        group_scores = head_scores.view(shape.kv_heads, group).sum(1) + kv_scores
        kv = top_sorted(group_scores, n_groups)
        return units.group_heads(kv), kv
    per_group = max(1, min(group, int(math.floor(keep_heads / shape.kv_heads + 0.5))))
    heads = []
    for g in range(shape.kv_heads):
        heads.extend(g * group + j for j in top_sorted(head_scores[g * group:(g + 1) * group], per_group))
    return tuple(heads), tuple(range(shape.kv_heads))


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
        layer = HeadUnits.of(shape, cfg.gqa_mode)
        if layer.mode == "mha":
            members = [(h,) for h in range(shape.heads)]
            values = [float(head_scores[h]) for h in range(shape.heads)]
        elif layer.mode == "groups":
            members = [layer.group_heads((g,)) for g in range(shape.kv_heads)]
            values = [float(head_scores[list(m)].sum() + scores.kv_heads[i][g]) for g, m in enumerate(members)]
        else:
            group = layer.group
            ranked = [sorted(range(g * group, (g + 1) * group), key=lambda h: (-float(head_scores[h]), h))
                      for g in range(shape.kv_heads)]
            members = [tuple(r[slot] for r in ranked) for slot in range(group)]
            values = [float(head_scores[list(m)].sum()) for m in members]
        unit_cost = adapter.block_flops(config, shape, seq_len) - adapter.block_flops(config, layer.without_one(), seq_len)
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
        kv = HeadUnits.of(shape, cfg.gqa_mode).kv_for(q)
        n_scored = sorted((u for u in kept_neurons if neurons.layer[u] == i), key=lambda u: -neurons.score[u])
        count = len(n_scored)
        if cfg.round_to > 1 and count >= cfg.round_to:
            count -= count % cfg.round_to  # round down, so the budget still holds
        keep_n = sorted(neurons.member[u][0] for u in n_scored[:max(count, 1)])
        layers.append(LayerPlan(tuple(q), tuple(kv), tuple(keep_n)))
    return PrunePlan(layers, list(shapes))


def _top_global(units: _Units, mandatory: set[int], keep: int) -> set[int]:
    rest = sorted((u for u in range(len(units.score)) if u not in mandatory), key=lambda u: (-units.score[u], u))
    return mandatory | set(rest[:max(0, keep - len(mandatory))])
