"""DistilBERT: q_lin/k_lin/v_lin/out_lin attention and lin1/lin2 FFN; config names differ (n_heads, dim)."""

from __future__ import annotations

from edgeprune.core.arch import register
from edgeprune.core.arch.base import IN, KV, OUT, Q, ArchAdapter, LayerShape
from edgeprune.core.arch.bert import linear_slices


@register
class DistilBertAdapter(ArchAdapter):
    model_types = ("distilbert",)
    attention_bypass = {"attention": "zero_attention", "sa_layer_norm": "identity"}
    ffn_bypass = {"ffn": "zero", "output_layer_norm": "identity"}
    mid_residual = ("sa_layer_norm", "output")
    blocks_path = "transformer.layer"

    def layers(self, model):
        return list(model.base_model.transformer.layer)

    def num_layers(self, config):
        return config.n_layers

    def head_dim(self, config):
        return config.dim // config.n_heads

    def hidden_size(self, config):
        return config.dim

    def dense_shapes(self, config):
        return [LayerShape(config.n_heads, config.n_heads, config.hidden_dim) for _ in range(config.n_layers)]

    def attention_slices(self, layer):
        attn = layer.attention
        return (linear_slices(attn.q_lin, (Q,), IN) + linear_slices(attn.k_lin, (KV,), IN)
                + linear_slices(attn.v_lin, (KV,), IN) + linear_slices(attn.out_lin, (Q,), OUT))

    def ffn_slices(self, layer):
        return linear_slices(layer.ffn.lin1, ("ffn",), IN) + linear_slices(layer.ffn.lin2, ("ffn",), OUT)

    def set_attention_shape(self, layer, shape: LayerShape, head_dim: int) -> None:
        # DistilBERT derives the per-head width as dim // n_heads, so both must shrink together.
        layer.attention.n_heads = shape.heads
        layer.attention.dim = shape.heads * head_dim
