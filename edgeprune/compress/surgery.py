"""Apply a plan: physically slice weights, and record per-layer shapes in the config so the model reloads."""

from __future__ import annotations

import torch

from edgeprune.core.arch.base import ArchAdapter
from edgeprune.compress.plan import PrunePlan
from edgeprune.core.anatomy import record_shapes


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
