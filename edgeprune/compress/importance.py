"""Importance criteria: small callables ``(model, adapter, calib) -> Scores``, registered by name.

Higher score = more important = kept. Calibrated criteria (taylor/fisher, activation, movement) register
here too and receive a list of tokenized calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from edgeprune.compress.adapters.base import KV, Q, ArchAdapter, unit_sq_norms
from edgeprune.errors import EdgePruneError


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer, one score per query head
    kv_heads: list[torch.Tensor]  # per layer, one score per KV head (equal to heads without GQA)
    neurons: list[torch.Tensor]  # per layer, one score per FFN neuron


class Importance(Protocol):
    def __call__(self, model: torch.nn.Module, adapter: ArchAdapter, calib: Sequence[dict] | None) -> Scores: ...


_IMPORTANCE: dict[str, Callable[..., Scores]] = {}
# Criteria that need calibration batches; the orchestrator checks this before loading data.
NEEDS_CALIBRATION: set[str] = set()


def register_importance(name: str, needs_calibration: bool = False):
    def decorator(fn):
        _IMPORTANCE[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn
    return decorator


def get_importance(name: str) -> Callable[..., Scores]:
    try:
        return _IMPORTANCE[name]
    except KeyError:
        raise EdgePruneError(f"unknown importance {name!r}; available: {', '.join(sorted(_IMPORTANCE))}") from None


def available_importance() -> list[str]:
    return sorted(_IMPORTANCE)


def layer_unit_sizes(adapter: ArchAdapter, model, index: int):
    shape = adapter.shapes(model.config)[index]
    head_dim = adapter.head_dim(model.config)
    sizes = {Q: shape.heads, KV: shape.kv_heads, "ffn": shape.ffn}
    widths = {Q: head_dim, KV: head_dim, "ffn": 1}
    return shape, sizes, widths


@register_importance("magnitude")
@torch.no_grad()
def magnitude(model, adapter: ArchAdapter, calib=None) -> Scores:
    """L2 norm of all weights that belong to a unit (producer rows plus consumer columns)."""
    heads, kv_heads, neurons = [], [], []
    for index in range(len(adapter.layers(model))):
        shape, sizes, widths = layer_unit_sizes(adapter, model, index)
        attn, ffn = adapter.unit_slices(model, index)
        totals = {Q: torch.zeros(shape.heads), KV: torch.zeros(shape.kv_heads), "ffn": torch.zeros(shape.ffn)}
        for spec in attn + ffn:
            if spec.name != "weight":
                continue
            for kind, value in unit_sq_norms(spec, sizes, widths).items():
                totals[kind] += value
        if shape.kv_heads == shape.heads:  # MHA: q and kv are the same unit
            totals[Q] = totals[Q] + totals[KV]
            totals[KV] = totals[Q].clone()
        heads.append(totals[Q].sqrt())
        kv_heads.append(totals[KV].sqrt())
        neurons.append(totals["ffn"].sqrt())
    return Scores(heads, kv_heads, neurons)
