"""BERT-style encoders (bert, roberta, xlm-roberta): separate query/key/value Linear layers."""

from __future__ import annotations

from edgeprune.core.arch import register
from edgeprune.core.arch.base import IN, KV, OUT, Q, ArchAdapter, LayerShape, ParamSlice


def linear_slices(linear, segments, role) -> list[ParamSlice]:
    """Weight (and bias for producers) of an nn.Linear sliced by output rows (IN) or input columns (OUT)."""
    if role == IN:
        out = [ParamSlice(linear, "weight", 0, segments, IN)]
        if linear.bias is not None:
            out.append(ParamSlice(linear, "bias", 0, segments, IN))
        return out
    return [ParamSlice(linear, "weight", 1, segments, OUT)]


@register
class BertAdapter(ArchAdapter):
    model_types = ("bert", "roberta", "xlm-roberta")
    # post-LN: the attention module includes its residual add and LayerNorm, so removing it passes its input on
    attention_bypass = {"attention": "pass_attention"}
    ffn_bypass = {"intermediate": "identity", "output": "pass_residual"}
    mid_residual = ("attention", "output")
    blocks_path = "encoder.layer"

    def layers(self, model):
        return list(model.base_model.encoder.layer)

    def attention_slices(self, layer):
        attn = layer.attention
        return (linear_slices(attn.self.query, (Q,), IN) + linear_slices(attn.self.key, (KV,), IN)
                + linear_slices(attn.self.value, (KV,), IN) + linear_slices(attn.output.dense, (Q,), OUT))

    def ffn_slices(self, layer):
        return linear_slices(layer.intermediate.dense, ("ffn",), IN) + linear_slices(layer.output.dense, ("ffn",), OUT)

    def set_attention_shape(self, layer, shape: LayerShape, head_dim: int) -> None:
        self_attn = layer.attention.self
        self_attn.num_attention_heads = shape.heads
        self_attn.all_head_size = shape.heads * head_dim
