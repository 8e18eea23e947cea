"""GGUF export: tiny random Llamas (even -> ``llama``, pruned uneven -> ``deci``) written and read back with
gguf.GGUFReader; marked ``llamacpp``: loaded in llama.cpp and compared with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeprune.cli import main
from edgeprune.core.errors import EdgePruneError
from edgeprune.exporters.api import ExportConfig, export
from edgeprune.core.ggufio import GGUF_FILE, export_loaded, iter_gguf_shapes, permute_rope, read_gguf_metadata
from edgeprune.core.loading import load_model
from tiny import gguf_vs_torch_logits, make_tiny, sample_texts, uneven_plan


def make_bpe_llama(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (the kind llama.cpp's gpt2 tokenizer reads)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(200, seed=seed), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return make_bpe_llama(tmp_path_factory.mktemp("bpe-llama"))


@pytest.fixture(scope="module")
def pruned_llama(bpe_llama, tmp_path_factory):
    from edgeprune.compress.api import CompressConfig
    from edgeprune.core.model_artifact import save_artifact
    from edgeprune.compress.surgery import apply_plan

    loaded = load_model(bpe_llama)
    plan = uneven_plan(loaded)
    apply_plan(loaded.model, loaded.adapter, plan)
    directory = tmp_path_factory.mktemp("pruned-llama")
    save_artifact(directory, loaded, CompressConfig().to_dict(), None, plan=plan)
    return directory


def read_fields(path: Path) -> dict:
    """Metadata through gguf's own reader (an independent parser from the exporter's fast one)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert {k: v for k, (v, _, _) in read_gguf_metadata(path).items()} == {
        k: v for k, v in fields.items() if not k.startswith("GGUF.")}  # the reader's pseudo-keys for the header
    return fields


@pytest.mark.parametrize("which", ["even", "uneven"])
def test_writer_metadata_and_shapes_read_back(bpe_llama, pruned_llama, which, tmp_path):
    loaded = load_model(bpe_llama if which == "even" else pruned_llama)
    shapes = loaded.adapter.shapes(loaded.model.config)
    info = export_loaded(loaded, tmp_path / GGUF_FILE, "f32", progress=False)
    fields = read_fields(tmp_path / GGUF_FILE)
    arch = "llama" if which == "even" else "deci"
    assert info["architecture"] == fields["general.architecture"] == arch
    heads, kv, ffn = ([s.heads for s in shapes], [s.kv_heads for s in shapes], [s.ffn for s in shapes])
    if which == "even":
        assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
        assert fields["llama.feed_forward_length"] == 128
    else:
        assert len(set(zip(heads, kv, ffn))) > 1  # the plan really is uneven
        assert fields["deci.attention.head_count"] == heads and fields["deci.attention.head_count_kv"] == kv
        assert fields["deci.feed_forward_length"] == ffn
    assert fields[f"{arch}.attention.key_length"] == 16 and fields[f"{arch}.rope.dimension_count"] == 16
    assert fields[f"{arch}.block_count"] == 2
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == loaded.model.config.vocab_size and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.merges"] and fields["tokenizer.ggml.bos_token_id"] == loaded.tokenizer.bos_token_id
    written = {name: shape for name, shape, _ in iter_gguf_shapes(tmp_path / GGUF_FILE)}
    assert "output.weight" not in written  # tied: llama.cpp reuses token_embd
    for i, s in enumerate(shapes):
        assert written[f"blk.{i}.attn_q.weight"] == (s.heads * 16, 64)
        assert written[f"blk.{i}.attn_k.weight"] == (s.kv_heads * 16, 64)
        assert written[f"blk.{i}.ffn_down.weight"] == (64, s.ffn)
    # f32 is exact, with Q/K rows permuted to llama.cpp's RoPE pair order
    import gguf

    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / GGUF_FILE)).tensors}
    q = loaded.model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], permute_rope(q, shapes[1].heads))
    v = loaded.model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], v)


def test_quantized_types_and_fallbacks(bpe_llama, tmp_path):
    loaded = load_model(bpe_llama)
    info = export_loaded(loaded, tmp_path / GGUF_FILE, "q4_0", progress=False)
    types = {name: t for name, _, t in iter_gguf_shapes(tmp_path / GGUF_FILE)}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"  # the tied LM head keeps 8 bits
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert info["tensor_types"]["q4_0"] == 14


def test_unsupported_architecture_and_type_are_clear(tiny_models, tmp_path):
    with pytest.raises(EdgePruneError, match=r"supports Llama-family decoders \(llama, mistral\); this model is 'gpt2'"):
        export_loaded(load_model(tiny_models("gpt2")), tmp_path / GGUF_FILE, "f16", progress=False)
    assert not (tmp_path / GGUF_FILE).exists()
    with pytest.raises(EdgePruneError, match="cannot be written as GGUF.*q4_0"):
        ExportConfig(target="llamacpp", quantize="q4_k_m")


def test_cli_refuses_bad_quant_type_before_work(tmp_path, capsys):
    assert main(["export", "nowhere", "-o", str(tmp_path / "out"), "--target", "llamacpp", "--quantize", "q6_k"]) == 2
    err = capsys.readouterr().err
    assert "edgeprune: error:" in err and "q6_k" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_without_llamacpp_says_how_to_install(bpe_llama, tmp_path, monkeypatch):
    from edgeprune.runtime import llamacpp_adapter

    monkeypatch.setattr(llamacpp_adapter.LlamaCppRuntime, "why_unavailable",
                        lambda self: "llama_cpp cannot be imported; run `edgeprune runtime install llamacpp`")
    with pytest.raises(EdgePruneError, match="edgeprune runtime install llamacpp"):
        export(bpe_llama, tmp_path / "out", ExportConfig(target="llamacpp", quantize="q8_0"), progress=False)
    assert not (tmp_path / "out").exists()


# --- through llama.cpp ------------------------------------------------------------------------------------------
@pytest.mark.llamacpp
@pytest.mark.parametrize("which,qtype", [("even", "f16"), ("uneven", "q8_0"), ("uneven", "f32")])
def test_export_validates_in_llamacpp(bpe_llama, pruned_llama, llamacpp_runtime, which, qtype, tmp_path):
    from edgeprune.core.artifacts import read_manifest

    source = bpe_llama if which == "even" else pruned_llama
    out = export(source, tmp_path / "out", ExportConfig(target="llamacpp", quantize=qtype), progress=False)
    manifest = read_manifest(out)
    report = manifest["validation"][qtype]
    assert report["passed"] and manifest["files_by_role"]["llamacpp"] == GGUF_FILE
    assert manifest["variants"][0]["architecture"] == ("llama" if which == "even" else "deci")
    assert report["decoder_gate"]["greedy"]["agreement"] >= 0.9
    assert report["tokenizer"]["same_ids"]
    # logits of the loaded file against PyTorch, independently of the export's own gate
    got, ref = gguf_vs_torch_logits(llamacpp_runtime, source, out / GGUF_FILE)
    tolerance = {"f32": 2e-3, "f16": 2e-2, "q8_0": 5e-2}[qtype]
    assert np.abs(got - ref).max() <= tolerance * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# --- streaming (tensor by tensor from the shards; docs/sequential.md) ---------------------------------------------
def _bf16_copy(source: Path, directory: Path) -> Path:
    """``source`` re-saved in bfloat16 (the dtype large checkpoints ship in)."""
    import torch

    loaded = load_model(source)
    loaded.model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("which", ["even", "uneven", "bf16"])
def test_blockwise_reference_gives_the_loaded_models_logits(bpe_llama, pruned_llama, which, tmp_path):
    import torch

    from edgeprune.compress.sequential import BlockwiseLogits

    source = {"even": bpe_llama, "uneven": pruned_llama}.get(which) or _bf16_copy(bpe_llama, tmp_path / "bf16")
    blockwise = BlockwiseLogits(source)
    ids = np.random.default_rng(0).integers(0, blockwise.config.vocab_size, size=(1, 40))
    model = load_model(source).model
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = blockwise(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert blockwise.loader.max_resident == 1  # one decoder block in memory at a time
    assert blockwise(ids[:, :7]).shape == (1, 7, ref.shape[-1])  # another call, another length


@pytest.mark.parametrize("which", ["even", "uneven"])
def test_streamed_gguf_is_byte_identical_to_the_in_memory_file(bpe_llama, pruned_llama, which, tmp_path):
    from edgeprune.core.ggufio import export_tensors
    from edgeprune.core.loading import resolve
    from edgeprune.exporters.gguf_api import in_memory_input, streaming_input

    source = bpe_llama if which == "even" else pruned_llama
    files = {}
    for kind, model in (("memory", in_memory_input(load_model(source))), ("streamed", streaming_input(resolve(source)))):
        read, shapes = model.tensors()
        files[kind] = tmp_path / f"{kind}.gguf"
        export_tensors(model.config, model.adapter, model.tokenizer, model.source, read, shapes, files[kind], "q8_0",
                       progress=False)
    assert files["memory"].read_bytes() == files["streamed"].read_bytes()


def test_streaming_refuses_what_it_cannot_stream_in_one_line(bpe_llama, tmp_path, capsys):
    from edgeprune.core.loading import resolve
    from edgeprune.exporters.gguf_api import streaming_input

    with pytest.raises(EdgePruneError, match="--streaming writes GGUF files"):
        export(bpe_llama, tmp_path / "out", ExportConfig(), streaming=True, progress=False)
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(EdgePruneError, match="not a gguf source"):
        streaming_input(resolve(gguf_file))
    assert main(["export", str(bpe_llama), "-o", str(tmp_path / "o2"), "--streaming"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune: error: --streaming writes GGUF") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


@pytest.mark.llamacpp
def test_streaming_export_validates_like_the_in_memory_one(pruned_llama, llamacpp_runtime, tmp_path, monkeypatch,
                                                           capsys):
    import psutil

    from edgeprune.core.artifacts import read_manifest

    config = ExportConfig(target="llamacpp", quantize="q8_0")
    memory = read_manifest(export(pruned_llama, tmp_path / "memory", config, progress=False))
    # a machine too small to load the model: the export streams by itself, and says so
    small = psutil.virtual_memory()._replace(available=1000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    streamed = read_manifest(export(pruned_llama, tmp_path / "streamed", config, progress=True))
    assert "tensor by tensor from the shards (--streaming)" in capsys.readouterr().err
    assert streamed["steps"]["gguf"]["streaming"] and not memory["steps"]["gguf"]["streaming"]
    assert (tmp_path / "memory" / GGUF_FILE).read_bytes() == (tmp_path / "streamed" / GGUF_FILE).read_bytes()
    got, ref = streamed["validation"]["q8_0"], memory["validation"]["q8_0"]
    assert got["passed"] and got["reference"].startswith("PyTorch fp32, block by block")
    for key in ("ratio", "reference", "candidate"):
        assert got["decoder_gate"]["perplexity"][key] == pytest.approx(ref["decoder_gate"]["perplexity"][key], rel=1e-5)
    assert got["decoder_gate"]["greedy"]["reference_tokens"] == ref["decoder_gate"]["greedy"]["reference_tokens"]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_quantizing_row_chunks_gives_the_whole_tensors_bytes(qtype):
    import gguf

    from edgeprune.core.ggufio import _encode, _ggml_type

    array = np.random.default_rng(1).normal(size=(37, 96)).astype(np.float32)
    whole = gguf.quantize(array, _ggml_type(qtype))
    chunked = _encode(array, qtype, chunk_bytes=5 * 96 * 4)  # 5 rows at a time, the last chunk short
    assert chunked.dtype == whole.dtype and chunked.shape == whole.shape
    assert chunked.tobytes() == whole.tobytes()


def test_a_plain_byte_level_tokenizer_is_written_with_llamacpps_gpt2_pre_tokenizer(bpe_llama):
    import transformers

    from edgeprune.core.ggufio import pre_tokenizer_name

    assert pre_tokenizer_name(transformers.AutoTokenizer.from_pretrained(bpe_llama)) == "gpt-2"


@pytest.mark.llamacpp
def test_smollm2_tokenizer_saved_by_transformers_splits_like_llamacpp(llamacpp_runtime, tmp_path):
    """transformers' conversion of SmolLM2's GGUF tokenizer pre-tokenizes with plain GPT-2 byte-level rules; the
    exported GGUF must tell llama.cpp so (with its ``default`` rules digits split differently)."""
    import torch
    import transformers

    from edgeprune.core.loading import smollm2_path
    from edgeprune.exporters.gguf_api import SAMPLE_TEXT

    if not smollm2_path().is_file():
        pytest.skip("smollm2-135m not fetched (edgeprune models fetch smollm2-135m)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_path().parent), gguf_file=smollm2_path().name)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "m")
    out = export(tmp_path / "m", tmp_path / "out", ExportConfig(target="llamacpp", quantize="f32",
                                                                 min_greedy_agreement=0.0, max_ppl_ratio=10.0),
                 progress=False)
    assert read_fields(out / GGUF_FILE)["tokenizer.ggml.pre"] == "gpt-2"
    session = llamacpp_runtime.load(str(out / GGUF_FILE), threads=1)
    try:
        text = SAMPLE_TEXT + " In 2024, 12345 people paid $3.50."
        assert session.encode(text, add_special_tokens=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        session.close()


def test_the_lm_head_keeps_more_precision_than_the_blocks():
    from edgeprune.core.ggufio import _tensor_type

    matrix = (64, 96)
    assert _tensor_type("q8_0", "token_embd.weight", matrix, tied_output=True) == "f16"  # q8_0: fidelity
    assert _tensor_type("q8_0", "output.weight", matrix, tied_output=False) == "f16"
    assert _tensor_type("q8_0", "token_embd.weight", matrix, tied_output=False) == "q8_0"  # input lookup only
    assert _tensor_type("q8_0", "blk.0.ffn_down.weight", matrix, tied_output=True) == "q8_0"
    assert _tensor_type("q4_0", "token_embd.weight", matrix, tied_output=True) == "q8_0"
    assert _tensor_type("q4_0", "blk.0.ffn_down.weight", matrix, tied_output=True) == "q4_0"
    assert _tensor_type("q4_0", "blk.0.attn_norm.weight", (96,), tied_output=True) == "f32"
