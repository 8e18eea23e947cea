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

    def __post_init__(self):
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise EdgePruneError(f"--{name} must be in [0, 1): the fraction to remove (got {value})")
        if self.round_to < 1:
            raise EdgePruneError(f"--round-to must be a positive integer (got {self.round_to})")
        if self.gqa_mode not in GQA_MODES:
            raise EdgePruneError(f"gqa_mode must be one of {', '.join(GQA_MODES)} (got {self.gqa_mode!r})")
        if self.flops_budget is not None and not 0.0 < self.flops_budget <= 1.0:
            raise EdgePruneError(f"--flops-budget must be in (0, 1] (got {self.flops_budget})")

    @property
    def active(self) -> bool:
        return self.heads > 0 or self.ffn > 0 or self.flops_budget is not None


@dataclass
class PrunePlan:
    layers: list[LayerPlan]
    dense: list[LayerShape]
    meta: dict = field(default_factory=dict)

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "dense": [s.to_dict() for s in self.dense],
            "kept": [s.to_dict() for s in self.shapes],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        return cls([LayerPlan.from_dict(d) for d in data["layers"]], [LayerShape(**d) for d in data["dense"]],
                   data.get("meta", {}))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PrunePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def identity(cls, shapes: list[LayerShape], adapter: ArchAdapter) -> "PrunePlan":
        layers = []
        for shape in shapes:
            layers.append(LayerPlan(tuple(range(shape.heads)), tuple(range(shape.kv_heads)), tuple(range(shape.ffn))))
        return cls(layers, list(shapes))


def kept_count(total: int, fraction: float, round_to: int = 1, unit_width: int = 1) -> int:
    """Units kept after removing ``fraction`` of ``total``: at least one, width a multiple of ``round_to``."""
    keep = max(1, total - int(math.floor(fraction * total + 0.5)))
    if round_to > 1:
        step = round_to // math.gcd(round_to, unit_width)
        if total >= step:
            keep = min(total - total % step, max(step, int(math.floor(keep / step + 0.5)) * step))
    return keep


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
