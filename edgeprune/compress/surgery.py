"""Apply a plan: physically slice weights, and record per-layer shapes in the config so the model reloads."""

from __future__ import annotations

import torch

from edgeprune.core.arch.base import ArchAdapter, LayerShape
from edgeprune.compress.plan import PrunePlan


def record_shapes(model: torch.nn.Module, shapes: list[LayerShape]) -> None:
    model.config.edgeprune_layers = [s.to_dict() for s in shapes]


def apply_plan(model: torch.nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> torch.nn.Module:
    current = adapter.shapes(model.config)
    if len(plan.layers) != len(current):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(current)}")
    new_shapes = [adapter.prune_layer(model, i, lp, shape) for i, (lp, shape) in enumerate(zip(plan.layers, current))]
    record_shapes(model, new_shapes)
    return model


def mask_plan(model: torch.nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> torch.nn.Module:
    """Zero removed units in place without changing shapes (the numerical reference for surgery)."""
    for i, (lp, shape) in enumerate(zip(plan.layers, adapter.shapes(model.config))):
        adapter.mask_layer(model, i, lp, shape)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def analytic_parameter_count(adapter: ArchAdapter, config, dense_total: int, shapes: list[LayerShape]) -> int:
    """Dense total minus what the per-layer formula says the removed units held."""
    dense_shapes = adapter.dense_shapes(config)
    removed = sum(adapter.block_params(config, d) - adapter.block_params(config, s) for d, s in zip(dense_shapes, shapes))
    return dense_total - removed


def analytic_flops(adapter: ArchAdapter, config, shapes: list[LayerShape], seq_len: int) -> int:
    return sum(adapter.block_flops(config, s, seq_len) for s in shapes)
