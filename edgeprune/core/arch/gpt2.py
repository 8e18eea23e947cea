"""GPT-2: Conv1D layers (weights stored input-major) and a fused c_attn holding q, k and v side by side."""

from __future__ import annotations

from edgeprune.core.arch import register
from edgeprune.core.arch.base import IN, KV, OUT, Q, ArchAdapter, LayerShape, ParamSlice


def conv1d_slices(conv, segments, role) -> list[ParamSlice]:
    if role == IN:  # produces units: slice output columns of the (in, out) weight and the bias
        return [ParamSlice(conv, "weight", 1, segments, IN), ParamSlice(conv, "bias", 0, segments, IN)]
    return [ParamSlice(conv, "weight", 0, segments, OUT)]


@register
class GPT2Adapter(ArchAdapter):
    model_types = ("gpt2",)
    is_decoder = True
    attention_bypass = {"ln_1": "identity", "attn": "zero_attention"}
    ffn_bypass = {"ln_2": "identity", "mlp": "zero"}
    mid_residual = ("ln_2", "input")
    blocks_path = "h"

    def layers(self, model):
        return list(model.base_model.h)

    def dense_shapes(self, config):
        ffn = config.n_inner or 4 * config.hidden_size
        return [LayerShape(config.n_head, config.n_head, ffn) for _ in range(config.n_layer)]

    def num_layers(self, config):
        return config.n_layer

    def head_dim(self, config):
        return config.hidden_size // config.n_head

    def attention_slices(self, layer):
        attn = layer.attn
        return conv1d_slices(attn.c_attn, (Q, KV, KV), IN) + conv1d_slices(attn.c_proj, (Q,), OUT)

    def ffn_slices(self, layer):
        return conv1d_slices(layer.mlp.c_fc, ("ffn",), IN) + conv1d_slices(layer.mlp.c_proj, ("ffn",), OUT)

    def set_attention_shape(self, layer, shape: LayerShape, head_dim: int) -> None:
        # forward splits c_attn's output by split_size, then reshapes with -1 heads of head_dim.
        layer.attn.num_heads = shape.heads
        layer.attn.split_size = shape.heads * head_dim
