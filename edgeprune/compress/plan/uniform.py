"""``uniform``: the same fraction in every layer."""

from __future__ import annotations

from edgeprune.compress.plan.base import PrunePlan, kept_count, register_allocation, top_sorted
from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.compress.plan.units import heads_for_layer
from edgeprune.core.arch.base import ArchAdapter, LayerPlan, LayerShape


@register_allocation("uniform")
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
