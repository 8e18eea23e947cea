"""Llama-family decoders (llama, mistral, qwen2): GQA attention and SwiGLU gate/up/down FFN.

A query head h belongs to KV group h // (heads / kv_heads). Plans keep whole KV groups with their query
heads, or the same number of query heads inside every group, so ``repeat_kv`` stays valid.
"""

from __future__ import annotations

from edgeprune.core.arch import register
from edgeprune.core.arch.base import IN, KV, OUT, Q, ArchAdapter, LayerShape
from edgeprune.core.arch.bert import linear_slices


@register
class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral", "qwen2")
    is_decoder = True
    ffn_matrices = 3
    norm_vectors_per_block = 2
    attention_bypass = {"input_layernorm": "identity", "self_attn": "zero_attention"}
    ffn_bypass = {"post_attention_layernorm": "identity", "mlp": "zero"}
    mid_residual = ("post_attention_layernorm", "input")
    blocks_path = "layers"

    def qkv_bias(self, config):
        return bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"

    def out_bias(self, config):
        return bool(getattr(config, "attention_bias", False))

    def ffn_bias(self, config):
        return bool(getattr(config, "mlp_bias", False))

    def layers(self, model):
        return list(model.base_model.layers)

    def head_dim(self, config):
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def attention_slices(self, layer):
        attn = layer.self_attn
        return (linear_slices(attn.q_proj, (Q,), IN) + linear_slices(attn.k_proj, (KV,), IN)
                + linear_slices(attn.v_proj, (KV,), IN) + linear_slices(attn.o_proj, (Q,), OUT))

    def ffn_slices(self, layer):
        mlp = layer.mlp
        return (linear_slices(mlp.gate_proj, ("ffn",), IN) + linear_slices(mlp.up_proj, ("ffn",), IN)
                + linear_slices(mlp.down_proj, ("ffn",), OUT))

    def set_attention_shape(self, layer, shape: LayerShape, head_dim: int) -> None:
        # q/k/v reshape with -1 heads; only the GQA repeat factor is stored on the module.
        layer.self_attn.num_key_value_groups = shape.heads // shape.kv_heads
