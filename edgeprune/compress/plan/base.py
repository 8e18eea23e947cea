"""The plan type (which heads, KV heads and FFN neurons each layer keeps), its counting helpers and the
registry of allocators that make plans."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.core.arch.base import ArchAdapter, LayerPlan, LayerShape
from edgeprune.core.errors import EdgePruneError


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


_ALLOCATORS: dict[str, Callable[..., PrunePlan]] = {}


def register_allocation(name: str):
    def decorator(fn):
        _ALLOCATORS[name] = fn
        return fn
    return decorator


def effective_allocation(cfg: StructuredConfig) -> str:
    """The allocator a config runs: ``uniform`` cannot meet a FLOPs budget, so with one it runs the budgeted
    global search (recorded as ``flops_budget``); in-memory and sequential compress share this rule."""
    return "flops_budget" if cfg.flops_budget is not None and cfg.allocation == "uniform" else cfg.allocation


def get_allocation(name: str) -> Callable[..., PrunePlan]:
    try:
        return _ALLOCATORS[name]
    except KeyError:
        raise EdgePruneError(f"unknown allocation {name!r}; available: {', '.join(sorted(_ALLOCATORS))}") from None
