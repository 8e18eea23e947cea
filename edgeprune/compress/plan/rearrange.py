"""Kwon et al. 2022's mask rearrangement and the joint (Fisher-block) removal it is built on."""

from __future__ import annotations

import torch

from edgeprune.compress.plan.base import PrunePlan
from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.compress.plan.units import HeadUnits
from edgeprune.core.arch.base import LayerPlan, LayerShape
from edgeprune.core.errors import EdgePruneError


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
        units = HeadUnits.of(dense, cfg.gqa_mode)
        if units.mode == "mha":
            heads = kv = _jointly_cheapest_removal(head_block, len(layer.keep_heads))
        elif units.mode == "groups":
            kv = _jointly_cheapest_removal(_kv_group_block(head_block, dense), len(layer.keep_kv_heads))
            heads = units.group_heads(kv)
        neurons = _jointly_cheapest_removal(scores.neuron_interactions[i], len(layer.keep_neurons))
        new = LayerPlan(tuple(heads), tuple(kv), tuple(neurons))
        changed.append([len(set(layer.keep_heads) - set(new.keep_heads)),
                        len(set(layer.keep_neurons) - set(new.keep_neurons))])
        layers.append(new)
    meta = dict(plan.meta, rearranged_heads_neurons=changed)
    return PrunePlan(layers, list(plan.dense), meta)
