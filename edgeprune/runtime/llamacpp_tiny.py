"""A tiny random-weight Llama written straight to GGUF (numpy + gguf only, no torch): the model the llama.cpp
install self-test generates with when no real model is in the cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    ffn: int


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's 256 byte tokens (its printable byte-to-unicode map), one merge, and BOS/EOS."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    byte_chars = dict(zip(printable, (chr(c) for c in codes)))
    tokens = [byte_chars[b] for b in range(256)] + ["Ġt", "<s>", "</s>"]
    return tokens, ["Ġ t"]


def write_random_llama(path: Path, qtype: str = "q4_0", hidden: int = 64, layers: int = 2,
                       shapes: list[Shape] | None = None, head_dim: int = 16, context: int = 128,
                       seed: int = 0) -> Path:
    import gguf

    from edgeprune.core.ggufio import write_gguf

    shapes = shapes or [Shape(4, 2, 128)] * layers
    tokens, merges = byte_level_vocab()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i, s in enumerate(shapes):
        p = f"model.layers.{i}"
        tensors.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                        f"{p}.self_attn.q_proj.weight": (s.heads * head_dim, hidden),
                        f"{p}.self_attn.k_proj.weight": (s.kv_heads * head_dim, hidden),
                        f"{p}.self_attn.v_proj.weight": (s.kv_heads * head_dim, hidden),
                        f"{p}.self_attn.o_proj.weight": (hidden, s.heads * head_dim),
                        f"{p}.mlp.gate_proj.weight": (s.ffn, hidden), f"{p}.mlp.up_proj.weight": (s.ffn, hidden),
                        f"{p}.mlp.down_proj.weight": (hidden, s.ffn)})

    def read(name: str) -> np.ndarray:
        shape = tensors[name]
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    config = SimpleNamespace(max_position_embeddings=context, hidden_size=hidden, rope_theta=10000.0,
                             rms_norm_eps=1e-5)
    T = gguf.GGUFValueType
    tokenizer = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", "default", T.STRING, None),
                 ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                 ("tokenizer.ggml.token_type", [1] * (vocab - 2) + [3, 3], T.ARRAY, T.INT32),
                 ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
                 ("tokenizer.ggml.bos_token_id", vocab - 2, T.UINT32, None),
                 ("tokenizer.ggml.eos_token_id", vocab - 1, T.UINT32, None)]
    arch = "deci" if len(set(shapes)) > 1 else "llama"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, read, tensors, arch, config, shapes, head_dim, vocab, qtype, tokenizer, "tiny-random-llama",
               progress=False)
    return path
