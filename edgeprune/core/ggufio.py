"""GGUF export for llama.cpp: Llama-family decoders (dense or pruned) -> ``model.gguf``.

Even layers are written as llama.cpp's ``llama`` architecture (loads in any build). Pruned models whose
layers differ in query heads, KV heads or FFN width are written as ``deci``, whose loader reads
``head_count``, ``head_count_kv`` and ``feed_forward_length`` as per-layer arrays (llama.cpp
src/models/deci.cpp). Both use llama.cpp's "normal" RoPE on consecutive pairs, so Q/K rows are permuted
from Hugging Face's rotate-half layout the way convert_hf_to_gguf.py does.

Tensors are quantized and written one at a time (tensor infos first, data streamed after) so the file is
never held in memory beside the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeprune.core.errors import EdgePruneError

GGUF_FILE = "model.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# What the gguf package's numpy quantizer can write (K-quants and i-quants it can only read).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")

# tokenizer.ggml.pre names llama.cpp knows, by the sha256 of str(tokenizer.encode(CHECK_TEXT)); the text and
# hashes are llama.cpp's own (conversion/base.py get_vocab_base_pre), so the same tokenizer gets the same name.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def check_gguf_type(name: str) -> None:
    if name not in GGUF_TYPES:
        raise EdgePruneError(f"--quantize {name!r} cannot be written as GGUF by the gguf package; choose one of "
                             f"{', '.join(GGUF_TYPES)}")


def _ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(name: str):
    import gguf

    return gguf.LlamaFileType.ALL_F32 if name == "f32" else gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]


@dataclass(frozen=True)
class TensorPlan:
    gguf_name: str
    hf_name: str
    qtype: str  # one of GGUF_TYPES
    permute_heads: int = 0  # >0: permute rows from HF rotate-half to llama.cpp's interleaved RoPE


def permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows (per head: first half, second half) -> llama.cpp's pairs (convert_hf_to_gguf's permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor_type(qtype: str, name: str, shape: tuple[int, ...], tied_output: bool, head_type: str | None = None) -> str:
    """Norms and biases stay f32; a row length the block size does not divide falls back to f16 (as
    convert_hf_to_gguf does). The LM head (the token embedding when tied) stays q8_0 under 4/5-bit types:
    llama.cpp's own quantizer keeps it at higher precision too (Q6_K, which gguf cannot write). Under q8_0,
    the type chosen for fidelity, it stays f16: measured on SmolLM2-135M (WikiText-2, 4,095 tokens), an
    all-q8_0 file is +0.51 % perplexity over PyTorch fp32 and the f16 LM head +0.07 % (f16 alone: +0.01 %),
    for an 18 % larger file and ~9 % slower decode (docs/llamacpp.md). ``head_type`` overrides the LM head's."""
    import gguf

    if len(shape) < 2 or qtype == "f32":
        return "f32"
    lm_head = name == "output.weight" or (tied_output and name == "token_embd.weight")
    if lm_head and head_type:
        qtype = head_type
    elif lm_head and qtype in LOW_BIT:
        qtype = "q8_0"
    elif lm_head and qtype == "q8_0":
        return "f16"
    if qtype in ("f16", "bf16"):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[_ggml_type(qtype)]
    return qtype if shape[-1] % block == 0 else "f16"


def tensor_plan(model_config, shapes, qtype: str, tied: bool, has_bias: dict[str, bool]) -> list[TensorPlan]:
    plans = [TensorPlan("token_embd.weight", "model.embed_tokens.weight", "")]
    for i, shape in enumerate(shapes):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        if shape.heads:  # an attention-free (depth-pruned) deci layer has no attention tensors
            plans += _attention_tensors(hf, blk, shape, has_bias)
        if shape.ffn:
            plans += _ffn_tensors(hf, blk, has_bias)
        else:
            plans += _ffn_stub(blk)
    plans.append(TensorPlan("output_norm.weight", "model.norm.weight", ""))
    if not tied:
        plans.append(TensorPlan("output.weight", "lm_head.weight", ""))
    return plans


def _attention_tensors(hf: str, blk: str, shape, has_bias: dict[str, bool]) -> list[TensorPlan]:
    plans = [TensorPlan(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight", ""),
             TensorPlan(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", "", shape.heads),
             TensorPlan(f"{blk}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", "", shape.kv_heads),
             TensorPlan(f"{blk}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", ""),
             TensorPlan(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", "")]
    if has_bias["qkv"]:
        plans += [TensorPlan(f"{blk}.attn_q.bias", f"{hf}.self_attn.q_proj.bias", "", shape.heads),
                  TensorPlan(f"{blk}.attn_k.bias", f"{hf}.self_attn.k_proj.bias", "", shape.kv_heads),
                  TensorPlan(f"{blk}.attn_v.bias", f"{hf}.self_attn.v_proj.bias", "")]
    if has_bias["out"]:
        plans.append(TensorPlan(f"{blk}.attn_output.bias", f"{hf}.self_attn.o_proj.bias", ""))
    return plans


# An FFN-free (depth-pruned) layer is written with a one-neuron all-zero FFN, whose output is exactly zero:
# llama.cpp's deci graph (src/models/deci.cpp) handles feed_forward_length 0 by `continue` before
# `inpL = cur`, which discards the layer's attention output (and aborts when it is the last layer).
FFN_STUB_WIDTH = 1
SYNTHETIC = "edgeprune.synthetic."  # hf_name prefix of tensors the exporter makes up (value kind first)


def _ffn_stub(blk: str) -> list[TensorPlan]:
    return [TensorPlan(f"{blk}.ffn_norm.weight", f"{SYNTHETIC}ones.norm", ""),
            TensorPlan(f"{blk}.ffn_gate.weight", f"{SYNTHETIC}zeros.in", ""),
            TensorPlan(f"{blk}.ffn_up.weight", f"{SYNTHETIC}zeros.in", ""),
            TensorPlan(f"{blk}.ffn_down.weight", f"{SYNTHETIC}zeros.out", "")]


def _synthetic_shape(name: str, hidden: int) -> tuple[int, ...]:
    return {"norm": (hidden,), "in": (FFN_STUB_WIDTH, hidden), "out": (hidden, FFN_STUB_WIDTH)}[name.split(".")[-1]]


def _synthetic(name: str, hidden: int) -> np.ndarray:
    fill = np.ones if name.startswith(f"{SYNTHETIC}ones") else np.zeros
    return fill(_synthetic_shape(name, hidden), dtype=np.float32)


def gguf_layer_shapes(shapes):
    """The per-layer shapes as written: FFN-free layers carry the stub width (see FFN_STUB_WIDTH)."""
    return [type(s)(s.heads, s.kv_heads, s.ffn or FFN_STUB_WIDTH) for s in shapes]


def _ffn_tensors(hf: str, blk: str, has_bias: dict[str, bool]) -> list[TensorPlan]:
    plans = [TensorPlan(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", ""),
             TensorPlan(f"{blk}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", ""),
             TensorPlan(f"{blk}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", ""),
             TensorPlan(f"{blk}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", "")]
    if has_bias["ffn"]:
        plans += [TensorPlan(f"{blk}.ffn_gate.bias", f"{hf}.mlp.gate_proj.bias", ""),
                  TensorPlan(f"{blk}.ffn_up.bias", f"{hf}.mlp.up_proj.bias", ""),
                  TensorPlan(f"{blk}.ffn_down.bias", f"{hf}.mlp.down_proj.bias", "")]
    return plans


def check_model_for_gguf(model_config, shapes) -> str:
    """The llama.cpp architecture to write (``llama`` or ``deci``), or a clear error."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgePruneError(f"GGUF export supports Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                             f"this model is {model_type!r}")
    scaling = getattr(model_config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in (None, "default"):
        raise EdgePruneError(f"GGUF export: RoPE scaling {kind!r} is not supported yet (only unscaled RoPE)")
    window = getattr(model_config, "sliding_window", None)
    if model_type == "mistral" and window and window < model_config.max_position_embeddings:
        raise EdgePruneError(f"GGUF export: Mistral sliding-window attention ({window} < "
                             f"{model_config.max_position_embeddings} positions) has no llama.cpp 'llama' equivalent")
    for i, s in enumerate(shapes):
        attention_free = s.heads == 0 and s.kv_heads == 0  # depth pruning removed the sublayer: deci expresses it
        if not attention_free and (s.heads <= 0 or s.kv_heads <= 0 or s.heads % s.kv_heads) or s.ffn < 0:
            raise EdgePruneError(f"GGUF export: layer {i} has {s.heads} query heads, {s.kv_heads} KV heads and FFN "
                                 f"width {s.ffn}; llama.cpp needs at least one of each and whole KV groups")
    if shapes and shapes[0].heads == 0:
        raise EdgePruneError("GGUF export: block 0 has no attention, and llama.cpp reads the head size from block 0's "
                             "head count (llama-model.cpp: `n_head() > 0`), so it could not load the file; keep block "
                             "0's attention (remove a later block's)")
    uneven = len({(s.heads, s.kv_heads, s.ffn) for s in shapes}) > 1
    return "deci" if uneven else "llama"


# --- tokenizer ---------------------------------------------------------------------------------------------
def source_gguf(source) -> Path | None:
    """The GGUF file a model (its ``ModelSource``; or the compressed artifact made from it) was read from, if it
    still exists."""
    from edgeprune.core.artifacts import read_manifest

    if source.kind == "gguf":
        return Path(source.path)
    parent, seen = None, 0
    if source.kind == "artifact":
        parent = read_manifest(source.path).get("parent")
    while isinstance(parent, dict) and seen < 16:
        seen += 1
        model = parent.get("model")
        if isinstance(model, dict) and model.get("kind") == "gguf" and Path(model.get("path", "")).is_file():
            return Path(model["path"])
        path = Path(parent.get("path", "") or "")
        if not (path / "manifest.json").is_file():
            return None
        parent = read_manifest(path).get("parent")
    return None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: Path, tensors: bool = False, offsets: bool = False):
    """Every key of a GGUF file's header as {key: (value, value type, array element type)}; with
    ``tensors``, also [(name, shape in ggml order, ggml type id)] of its tensor infos (with ``offsets``,
    each also with its data's absolute byte offset in the file).

    A direct parse of the (little-endian, v2/v3) key-value section: gguf.GGUFReader maps every string of a
    50k-token vocabulary to its own numpy array, which takes minutes on a busy 2-core machine."""
    import struct

    def scalar(handle, kind):
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]

    def string(handle):
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length).decode("utf-8", errors="replace")

    def value(handle, kind):
        if kind == 8:
            return string(handle)
        if kind == 9:
            sub, count = struct.unpack("<IQ", handle.read(12))
            if sub in _SCALARS:
                fmt = _SCALARS[sub]
                return list(struct.unpack(f"<{count}{fmt[1]}", handle.read(count * struct.calcsize(fmt)))), sub
            return [value(handle, sub) for _ in range(count)], sub
        return scalar(handle, kind)

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise EdgePruneError(f"{path}: not a GGUF file")
        version, tensor_count, kv_count = struct.unpack("<IQQ", handle.read(20))
        if version < 2:
            raise EdgePruneError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
        fields: dict[str, tuple[Any, int, int | None]] = {}
        for _ in range(kv_count):
            key = string(handle)
            (kind,) = struct.unpack("<I", handle.read(4))
            got = value(handle, kind)
            fields[key] = (got[0], kind, got[1]) if kind == 9 else (got, kind, None)
        if not tensors:
            return fields
        infos = []
        for _ in range(tensor_count):
            name = string(handle)
            (dims,) = struct.unpack("<I", handle.read(4))
            shape = struct.unpack(f"<{dims}Q", handle.read(8 * dims))
            ggml_type, offset = struct.unpack("<IQ", handle.read(12))
            infos.append((name, tuple(shape), ggml_type, offset) if offsets else (name, tuple(shape), ggml_type))
        if offsets:  # tensor offsets count from the aligned end of the header
            alignment = int(fields.get("general.alignment", (32,))[0])
            start = -(-handle.tell() // alignment) * alignment
            infos = [(name, shape, ggml_type, start + offset) for name, shape, ggml_type, offset in infos]
    return fields, infos


def tokenizer_from_gguf(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of a GGUF file as (key, value, type, array sub-type), copied verbatim."""
    import gguf

    T = gguf.GGUFValueType
    return [(key, val, T(kind), T(sub) if sub is not None else None)
            for key, (val, kind, sub) in read_gguf_metadata(path).items() if key.startswith("tokenizer.")]


def pre_tokenizer_name(tokenizer) -> str | None:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return KNOWN_PRE_TOKENIZERS.get(digest) or _plain_byte_level(tokenizer)


def _plain_byte_level(tokenizer) -> str | None:
    """``gpt-2`` for a tokenizer whose whole pre-tokenization is GPT-2's byte-level split (what transformers
    builds when it converts a GGUF tokenizer, and many small BPE models): llama.cpp's ``gpt-2`` pre-tokenizer
    is that regex, where its ``default`` one splits digits and punctuation differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    plain = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))
    no_normalizer = normalizer is None or normalizer == {"type": "Sequence", "normalizers": []}
    return "gpt-2" if plain and no_normalizer else None


def tokenizer_from_hf(tokenizer) -> tuple[list[tuple[str, Any, Any, Any]], dict[str, Any]]:
    """GPT-2 style BPE vocabulary, merges, special ids and chat template from a fast HF tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgePruneError("GGUF export needs a fast (tokenizer.json) tokenizer")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise EdgePruneError(f"GGUF export writes BPE tokenizers only; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    for text, idx in vocab.items():
        tokens[idx] = text
        if text in added:
            types[idx] = gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED
        else:
            types[idx] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer_name(tokenizer)
    T = gguf.GGUFValueType
    items = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre or "default", T.STRING, None),
             ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
             ("tokenizer.ggml.token_type", [int(t) for t in types], T.ARRAY, T.INT32),
             ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, key, None)
        if value is not None:
            items.append((f"tokenizer.ggml.{role}_token_id", int(value), T.UINT32, None))
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if add_bos is not None:
        items.append(("tokenizer.ggml.add_bos_token", bool(add_bos), T.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        items.append(("tokenizer.chat_template", template, T.STRING, None))
    return items, {"pre_tokenizer": pre or "default", "pre_tokenizer_known": pre is not None}


# --- writing -------------------------------------------------------------------------------------------------
def _metadata(writer, arch: str, model_config, shapes, head_dim: int, vocab_size: int, qtype: str, name: str) -> None:
    import gguf

    per_layer = arch == "deci"
    first = shapes[0]
    writer.add_name(name)
    writer.add_context_length(int(model_config.max_position_embeddings))
    writer.add_embedding_length(int(model_config.hidden_size))
    writer.add_block_count(len(shapes))
    writer.add_feed_forward_length([s.ffn for s in shapes] if per_layer else first.ffn)
    writer.add_head_count([s.heads for s in shapes] if per_layer else first.heads)
    writer.add_head_count_kv([s.kv_heads for s in shapes] if per_layer else first.kv_heads)
    # llama.cpp derives the head size from n_embd / n_head(layer 0) unless told; pruned heads break that.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(model_config, "rope_theta", 10000.0) or 10000.0))
    writer.add_layer_norm_rms_eps(float(model_config.rms_norm_eps))
    writer.add_vocab_size(int(vocab_size))
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


ENCODE_CHUNK_BYTES = 16 * 2**20  # float32 rows quantized per step: the numpy quantizer's temporaries are
# several times its input, which for a large embedding table would be gigabytes


def _encode(array: np.ndarray, qtype: str, chunk_bytes: int = ENCODE_CHUNK_BYTES) -> np.ndarray:
    import gguf

    if qtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == "f16":
        return np.ascontiguousarray(array, dtype=np.float16)
    kind = _ggml_type(qtype)
    if array.ndim < 2:
        return gguf.quantize(np.ascontiguousarray(array, dtype=np.float32), kind)
    # blocks never cross a row, so quantizing row chunks into the output gives the same bytes
    out = np.empty(gguf.quant_shape_to_byte_shape(array.shape, kind), dtype=np.uint8)
    rows = max(1, chunk_bytes // (4 * int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], rows):
        out[start:start + rows] = gguf.quantize(np.ascontiguousarray(array[start:start + rows], dtype=np.float32),
                                                kind)
    return out


def _byte_shape(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], Any, int]:
    """(shape for add_tensor_info, numpy dtype, bytes) without quantizing anything yet."""
    import gguf

    n = int(np.prod(shape))
    if qtype == "f32":
        return shape, np.float32, 4 * n
    if qtype == "f16":
        return shape, np.float16, 2 * n
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, _ggml_type(qtype)))
    return byte_shape, np.uint8, int(np.prod(byte_shape))


# (hf_name, float32 tensor in the file's row order, GGUF type) -> the tensor's bytes, or None for the default
TensorQuantizer = Callable[[str, np.ndarray, str], "np.ndarray | None"]


def write_gguf(path: Path, state: Callable[[str], np.ndarray], tensor_shapes: dict[str, tuple[int, ...]], arch: str,
               model_config, shapes, head_dim: int, vocab_size: int, qtype: str, tokenizer_items, name: str,
               progress: bool = True, quantizer: TensorQuantizer | None = None,
               head_type: str | None = None) -> dict[str, Any]:
    """Stream a GGUF file: ``state(hf_name)`` returns one float32 tensor at a time. ``quantizer`` may encode a
    tensor itself (e.g. GPTQ); where it returns None, the gguf package rounds it to nearest. ``head_type``:
    the LM head's GGUF type (None: ``_tensor_type``'s rule)."""
    import gguf
    from tqdm.auto import tqdm

    tied = "lm_head.weight" not in tensor_shapes
    # any layer (the first one may have lost its attention or FFN to depth pruning)
    has_bias = {key: any(name.startswith("model.layers.") and name.endswith(suffix) for name in tensor_shapes)
                for key, suffix in (("qkv", ".self_attn.q_proj.bias"), ("out", ".self_attn.o_proj.bias"),
                                    ("ffn", ".mlp.gate_proj.bias"))}
    plans = tensor_plan(model_config, shapes, qtype, tied, has_bias)
    hidden = int(model_config.hidden_size)
    tensor_shapes = dict(tensor_shapes, **{p.hf_name: _synthetic_shape(p.hf_name, hidden) for p in plans
                                          if p.hf_name.startswith(SYNTHETIC)})
    missing = [p.hf_name for p in plans if p.hf_name not in tensor_shapes]
    if missing:
        raise EdgePruneError(f"GGUF export: the model has no {missing[0]} (not a standard Llama layout)")
    writer = gguf.GGUFWriter(str(path), arch)
    types: dict[str, int] = {}
    try:
        _metadata(writer, arch, model_config, gguf_layer_shapes(shapes), head_dim, vocab_size, qtype, name)
        for key, value, vtype, sub in tokenizer_items:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        resolved = []
        for plan in plans:
            shape = tuple(int(d) for d in tensor_shapes[plan.hf_name])
            ttype = _tensor_type(qtype, plan.gguf_name, shape, tied, head_type)
            info_shape, dtype, nbytes = _byte_shape(shape, ttype)
            raw = None if ttype in ("f32", "f16") else _ggml_type(ttype)
            writer.add_tensor_info(plan.gguf_name, info_shape, np.dtype(dtype), nbytes, raw_dtype=raw)
            resolved.append((plan, ttype))
            types[ttype] = types.get(ttype, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan, ttype in tqdm(resolved, desc=f"writing GGUF ({qtype})", disable=not progress, leave=False):
            data = _synthetic(plan.hf_name, hidden) if plan.hf_name.startswith(SYNTHETIC) else state(plan.hf_name)
            if plan.permute_heads:
                data = permute_rope(data, plan.permute_heads)
            encoded = quantizer(plan.hf_name, data, ttype) if quantizer is not None else None
            writer.write_tensor_data(encoded if encoded is not None else _encode(data, ttype))
    finally:
        writer.close()
    return {"architecture": arch, "tensors": len(plans), "tensor_types": types, "tied_embeddings": tied}


def model_tensors(model) -> tuple[Callable[[str], np.ndarray], dict[str, tuple[int, ...]]]:
    """Read one parameter at a time as float32 numpy (a view of the torch storage, no copy of the model)."""
    import torch

    named = dict(model.named_parameters())
    named.update({k: v for k, v in model.named_buffers() if k.endswith(".weight")})
    if getattr(model.config, "tie_word_embeddings", False):
        named.pop("lm_head.weight", None)
    shapes = {k: tuple(v.shape) for k, v in named.items()}

    def read(name: str) -> np.ndarray:
        with torch.no_grad():
            return named[name].detach().to(torch.float32).cpu().numpy()

    return read, shapes


def export_loaded(loaded, path: Path, qtype: str, progress: bool = True, quantizer: TensorQuantizer | None = None,
                  head_type: str | None = None) -> dict[str, Any]:
    """Write ``loaded`` (an ``edgeprune.core.loading.LoadedModel``) to ``path`` as GGUF; returns what was written."""
    read, tensor_shapes = model_tensors(loaded.model)
    return export_tensors(loaded.model.config, loaded.adapter, loaded.tokenizer, loaded.source, read, tensor_shapes,
                          path, qtype, progress, quantizer, head_type)


def export_tensors(config, adapter, tokenizer, source, read: Callable[[str], np.ndarray],
                   tensor_shapes: dict[str, tuple[int, ...]], path: Path, qtype: str,
                   progress: bool = True, quantizer: TensorQuantizer | None = None,
                   head_type: str | None = None) -> dict[str, Any]:
    """Write a model given as ``read(hf_name) -> float32 array`` (one tensor at a time: from a model in memory
    or straight from a checkpoint's shards) to ``path`` as GGUF; ``source`` is its ``ModelSource``."""
    check_gguf_type(qtype)
    shapes = adapter.shapes(config)
    arch = check_model_for_gguf(config, shapes)
    gguf_source = source_gguf(source)
    if gguf_source is not None:
        tokenizer_items = tokenizer_from_gguf(gguf_source)
        tokenizer_info = {"from": str(gguf_source)}
    else:
        tokenizer_items, tokenizer_info = tokenizer_from_hf(tokenizer)
        tokenizer_info["from"] = "Hugging Face tokenizer"
    vocab_size = tensor_shapes["model.embed_tokens.weight"][0]
    name = source.alias or Path(source.path).stem
    info = write_gguf(path, read, tensor_shapes, arch, config, shapes, adapter.head_dim(config), vocab_size,
                      qtype, tokenizer_items, name, progress, quantizer, head_type)
    info.update({"quantization": qtype, "tokenizer": tokenizer_info, "bytes": path.stat().st_size,
                 "layer_shapes": [s.to_dict() for s in shapes]})
    return info


def iter_gguf_shapes(path: Path) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, logical shape in numpy order, ggml type name) of every tensor in a GGUF file."""
    import gguf

    _, infos = read_gguf_metadata(path, tensors=True)
    for name, shape, ggml_type in infos:
        yield name, tuple(int(d) for d in reversed(shape)), gguf.GGMLQuantizationType(ggml_type).name
