"""Torch-free model anatomy: per-layer shapes recorded in a config, parameter and FLOP counts.

The formulas themselves live with each architecture (``ArchAdapter.block_params`` / ``block_flops``); these
helpers only sum them, so exporters, compress and bench count the same way without importing torch.
"""

from __future__ import annotations

from typing import Any, Sequence


def record_shapes(model: Any, shapes: Sequence[Any]) -> None:
    """Store per-layer shapes in the model's config (``edgeprune_layers``) so the pruned model reloads."""
    model.config.edgeprune_layers = [s.to_dict() for s in shapes]


def parameter_count(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def analytic_parameter_count(adapter, config, dense_total: int, shapes: Sequence[Any]) -> int:
    """Dense total minus what the per-layer formula says the removed units held."""
    dense_shapes = adapter.dense_shapes(config)
    removed = sum(adapter.block_params(config, d) - adapter.block_params(config, s) for d, s in zip(dense_shapes, shapes))
    return dense_total - removed


def analytic_flops(adapter, config, shapes: Sequence[Any], seq_len: int) -> int:
    return sum(adapter.block_flops(config, s, seq_len) for s in shapes)
