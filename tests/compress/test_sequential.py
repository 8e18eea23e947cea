"""Sequential (block-by-block) compression: same result as in memory for the same plan, lazy readers equal
eager loads (safetensors, sharded, GGUF vs transformers' conversion), one block resident at a time, the
artifact reloads / evaluates / exports, and bad input fails in one line with nothing left behind."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig, CompressConfig, ReconstructConfig, compress
from edgeprune.compress.plan import StructuredConfig
from edgeprune.core.errors import EdgePruneError
from tests.tiny import make_tiny, sample_texts


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    calib = root / "calib.txt"
    calib.write_text("\n".join(sample_texts(200)))
    return {family: make_tiny(family, root / family) for family in ("llama", "qwen2")}, calib


def _config(calib, importance="flap", allocation="uniform", reconstruct=True, **structured):
    structured = {"heads": 0.34, "ffn": 0.25, "gqa_mode": "groups", **structured}
    return CompressConfig(
        structured=StructuredConfig(importance=importance, allocation=allocation, **structured),
        calibration=CalibrationConfig(path=str(calib), samples=12, max_length=16, batch_size=4),
        reconstruct=ReconstructConfig(enabled=reconstruct, mode="full"))


def _logits(directory, ids):
    import edgeprune

    with torch.no_grad():
        return edgeprune.load(directory).model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("importance,allocation,extra", [
    ("flap", "uniform", {}),
    ("magnitude", "global", {"flops_budget": 0.7, "seq_len": 1}),
    ("fisher", "global", {"flops_budget": 0.7, "seq_len": 1}),
    ("fisher", "joint", {"flops_budget": 0.7, "seq_len": 1}),
    ("taylor", "uniform", {}),
])
def test_sequential_equals_in_memory(tiny_models, tmp_path, family, importance, allocation, extra):
    models, calib = tiny_models
    config = _config(calib, importance, allocation, **extra)
    dense = compress(models[family], tmp_path / "mem", config, sequential=False)
    seq = compress(models[family], tmp_path / "seq", config, sequential=True, dtype="fp32")
    plan_mem, plan_seq = (json.loads((d / "plan.json").read_text()) for d in (dense, seq))
    assert plan_seq["layers"] == plan_mem["layers"]
    assert plan_seq["kept"] != plan_seq["dense"]  # something was pruned
    ids = torch.randint(7, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(seq, ids), _logits(dense, ids), rtol=1e-4, atol=1e-5)
    manifest = json.loads((seq / "manifest.json").read_text())
    assert manifest["parameters"] == json.loads((dense / "manifest.json").read_text())["parameters"]
    assert manifest["sequential"]["max_resident_blocks"] == 1


def test_one_block_materialised_at_a_time(tiny_models, tmp_path, monkeypatch):
    from edgeprune.compress import sequential

    models, calib = tiny_models
    seen = []
    original = sequential.BlockLoader.load

    def load(self, index):
        layer = original(self, index)
        real = [n for n, p in self.skeleton.named_parameters() if p.device.type != "meta"]
        seen.append((index, real))
        return layer

    monkeypatch.setattr(sequential.BlockLoader, "load", load)
    compress(models["llama"], tmp_path / "seq", _config(calib), sequential=True)
    assert len(seen) == 4  # two blocks, two passes
    for index, real in seen:  # only that block's tensors are real; embeddings, norm, head stay on meta
        assert real and all(name.startswith(f"model.layers.{index}.") for name in real), real


def test_bf16_artifact_reloads_evaluates_and_exports(tiny_models, tmp_path):
    import edgeprune

    models, calib = tiny_models
    out = compress(models["llama"], tmp_path / "seq", _config(calib, reconstruct=False), sequential=True,
                   dtype="bf16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    loaded = edgeprune.load(out)
    assert [s.to_dict() for s in loaded.adapter.shapes(loaded.model.config)] == \
        json.loads((out / "plan.json").read_text())["kept"]
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(sample_texts(40, seed=3)))
    run = lambda *args: subprocess.run([sys.executable, "-m", "edgeprune.cli", *args], capture_output=True, text=True)
    result = run("eval", str(out), "--task", "perplexity", "--data", str(text), "--window", "64", "--stride", "32",
                 "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["value"] > 1
    result = run("export", str(out), "-o", str(tmp_path / "onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_safetensors_reader_equals_eager_load(tiny_models, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from edgeprune.compress.lazy_weights import SafetensorsWeights

    models, _ = tiny_models
    single = SafetensorsWeights(models["llama"])
    eager = load_file(str(models["llama"] / "model.safetensors"))
    assert set(single.names()) == set(eager)
    for name in eager:
        assert torch.equal(single.get(name), eager[name])
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    sharded = SafetensorsWeights(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for name in eager:
        assert torch.equal(sharded.get(name), eager[name])
    assert sharded.numel() == sum(t.numel() for t in eager.values())


def _permute_like_llama_cpp(weights, n_head, n_head_kv):
    # convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of every head
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(directory: Path, path: Path, quantize: bool) -> dict:
    """A llama GGUF of a tiny HF model the way llama.cpp's converter writes one (names, Q/K permutation)."""
    import gguf
    import numpy as np
    import transformers
    from gguf import GGMLQuantizationType as Q

    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    # a llama (SentencePiece-style) tokenizer over the tiny vocabulary, as llama.cpp's converter writes one
    from tests.tiny import SPECIALS, WORDS

    tokens = SPECIALS + list(WORDS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_unk_token_id(tokens.index("[UNK]"))
    writer.add_pad_token_id(tokens.index("[PAD]"))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, value in state.items():
        base, suffix = name.rsplit(".", 1)
        if name.endswith("q_proj.weight"):
            value = _permute_like_llama_cpp(value, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = _permute_like_llama_cpp(value, config.num_attention_heads, config.num_key_value_heads)
        value = np.ascontiguousarray(value, dtype=np.float32)
        if quantize and value.ndim == 2 and value.shape[-1] % 32 == 0:
            writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", gguf.quants.quantize(value, Q.Q8_0),
                              raw_shape=gguf.quant_shape_to_byte_shape(value.shape, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("quantize", [False, True])
def test_gguf_reader_equals_transformers_conversion(tiny_models, tmp_path, quantize):
    import transformers
    from accelerate import init_empty_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from edgeprune.compress.lazy_weights import GGUFWeights

    models, _ = tiny_models
    path = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(models["llama"], path, quantize)
    config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    lazy = GGUFWeights(path, skeleton)
    converted = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(lazy.names()) == set(converted)
    for name, tensor in converted.items():
        assert torch.equal(lazy.get(name), tensor.float()), name
    if not quantize:  # float32 round trip: the Q/K permutation is undone exactly
        for name in converted:
            assert torch.equal(lazy.get(name), original[name]), name


@pytest.mark.slow
def test_gguf_reader_on_smollm2_equals_transformers():
    import transformers
    from accelerate import init_empty_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from edgeprune.compress.lazy_weights import GGUFWeights
    from edgeprune.core.loading import smollm2_path

    path = smollm2_path()
    if not path.is_file():
        pytest.skip("run `edgeprune models fetch smollm2-135m` first")
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    converted = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    lazy = GGUFWeights(path, skeleton)
    assert set(lazy.names()) == set(converted)
    for name, tensor in converted.items():
        assert torch.equal(lazy.get(name), tensor.float()), name


@pytest.mark.slow
def test_smollm2_tokenizer_from_one_parse_equals_autotokenizer():
    import transformers

    from edgeprune.compress import sequential
    from edgeprune.core.loading import resolve, smollm2_path

    path = smollm2_path()
    if not path.is_file():
        pytest.skip("run `edgeprune models fetch smollm2-135m` first")
    source = resolve("smollm2-135m")
    parsed = sequential._parse_gguf(source)
    tokenizer = sequential._load_tokenizer(source, sequential._read_config(source, parsed), parsed)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "The quick brown fox, 1,234 émigrés and <|im_start|>user\nHello!<|im_end|>"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.get_vocab() == reference.get_vocab() and tokenizer.eos_token == reference.eos_token


def test_sequential_from_gguf_equals_in_memory(tiny_models, tmp_path):
    models, calib = tiny_models
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(models["llama"], path, quantize=True)
    config = _config(calib, "magnitude", reconstruct=False)
    mem = compress(path, tmp_path / "mem", config, sequential=False)
    seq = compress(path, tmp_path / "seq", config, sequential=True)
    assert json.loads((seq / "plan.json").read_text())["layers"] == json.loads((mem / "plan.json").read_text())["layers"]
    ids = torch.randint(7, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(seq, ids), _logits(mem, ids), rtol=1e-4, atol=1e-5)


def test_gguf_metadata_parsed_once_equals_transformers(tiny_models, tmp_path, monkeypatch):
    """The config and tokenizer built from one parse of the GGUF metadata equal AutoConfig's and
    AutoTokenizer's (which parse it again each), and the sequential path parses it exactly once."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from edgeprune.compress import sequential
    from edgeprune.core.loading import resolve

    models, calib = tiny_models
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(models["llama"], path, quantize=False)
    source = resolve(str(path))
    parsed = sequential._parse_gguf(source)
    config = sequential._read_config(source, parsed)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert config.to_dict() == theirs.to_dict()
    tokenizer = sequential._load_tokenizer(source, config, parsed)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert type(tokenizer) is type(reference)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert tokenizer.all_special_tokens == reference.all_special_tokens
    text = "the dog runs in the park . a small cat sits"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]

    calls = []
    original = gguf_utils.load_gguf_checkpoint
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: calls.append(a) or original(*a, **k))
    compress(path, tmp_path / "seq", _config(calib, "magnitude", reconstruct=False), sequential=True)
    assert len(calls) == 1


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sequential_fisher_scores_equal_whole_model_fisher(tiny_models, tmp_path, monkeypatch, batch_size):
    """The block-by-block backward sweep gives the whole model's Fisher: its diagonal, the heads' and the
    neurons' interaction blocks (rows read from disk) and the Taylor sums. With one sequence per batch the
    pseudo-labels are the same draws, so the scores agree to float rounding; with larger batches the
    in-memory path draws a batch's labels in one call (other draws), so only the plan's test above applies."""
    from edgeprune.compress import sequential_fisher
    from edgeprune.compress.plan import base

    models, calib = tiny_models
    recorded = {}
    joint = base._ALLOCATORS["joint"]

    def recording(scores, *args, **kwargs):  # the sequential rows are on disk only until the plan is made
        blocks = [b.materialize() if hasattr(b, "materialize") else b for b in scores.neuron_interactions]
        recorded[len(recorded)] = (scores, blocks)
        return joint(scores, *args, **kwargs)

    monkeypatch.setitem(base._ALLOCATORS, "joint", recording)
    monkeypatch.setattr(sequential_fisher, "HEAD_TOKENS", 5)  # the LM head's logits in chunks of tokens
    config = _config(calib, "fisher", "joint", flops_budget=0.7, seq_len=1)
    config = config.replace(calibration=config.calibration.replace(batch_size=batch_size))
    compress(models["llama"], tmp_path / "mem", config, sequential=False)
    compress(models["llama"], tmp_path / "seq", config, sequential=True, dtype="fp32")
    (mem, mem_blocks), (seq, seq_blocks) = recorded[0], recorded[1]
    assert seq.comparable and mem.comparable
    assert not list(tmp_path.glob(".edgeprune-fisher-*"))  # the scratch directory is gone
    if batch_size > 1:
        return
    for a, b in zip(mem.heads + mem.kv_heads + mem.neurons, seq.heads + seq.kv_heads + seq.neurons):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9)
    for a, b in zip(mem.head_interactions, seq.head_interactions):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9)
    for a, b, rows in zip(mem_blocks, seq_blocks, seq.neuron_interactions):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(rows.diagonal(), a.diagonal(), rtol=1e-4, atol=1e-9)


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structured,message", [
    ({"importance": "movement"}, "importance 'movement' cannot be computed block by block; use one that can (flap, magnitude, fisher, taylor)"),
    ({"importance": "flap", "allocation": "joint", "flops_budget": 0.7}, "allocation 'joint' needs the Fisher interaction blocks; use --importance fisher"),
    ({"importance": "fisher", "rearrange": True}, "--rearrange needs the whole model at once"),
])
def test_whole_model_criteria_are_refused(tiny_models, tmp_path, structured, message):
    models, calib = tiny_models
    config = CompressConfig(structured=StructuredConfig(heads=0.3, ffn=0.3, **structured),
                            calibration=CalibrationConfig(path=str(calib)))
    with pytest.raises(EdgePruneError, match="--sequential") as info:
        compress(models["llama"], tmp_path / "out", config, sequential=True)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_one_line_errors(tiny_models, tmp_path):
    models, calib = tiny_models
    bert = make_tiny("bert", tmp_path / "bert")
    run = lambda *args: subprocess.run([sys.executable, "-m", "edgeprune.cli", "compress", *args],
                                       capture_output=True, text=True)
    result = run(str(bert), "-o", str(tmp_path / "b"), "--sequential", "--heads", "0.5")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("edgeprune: error: --sequential supports the Llama family")
    result = run(str(models["llama"]), "-o", str(tmp_path / "f"), "--sequential", "--heads", "0.3",
                 "--importance", "movement", "--calib", str(calib))
    assert result.returncode != 0 and "cannot be computed block by block" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists() and not (tmp_path / "f").exists()


def test_missing_shard_is_named(tiny_models, tmp_path):
    import transformers

    models, calib = tiny_models
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    transformers.AutoTokenizer.from_pretrained(models["llama"]).save_pretrained(tmp_path / "sharded")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(EdgePruneError, match=f"shard {shards[1].name} is named in model.safetensors.index.json "
                                             "but missing"):
        compress(tmp_path / "sharded", tmp_path / "out", _config(calib), sequential=True)
    assert not (tmp_path / "out").exists()


def test_disk_full_while_writing_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from edgeprune.compress import sequential

    models, calib = tiny_models
    shards = set()

    def full_disk(handle, data):
        shards.add(Path(handle.name).stem)
        if len(shards) == 2:  # the first shard went through, the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(handle, data)

    real_write = sequential._write_bytes
    monkeypatch.setattr(sequential, "_write_bytes", full_disk)
    monkeypatch.setattr(sequential, "SHARD_BYTES", 1)  # a shard per tensor, so the failure is mid-way
    with pytest.raises(EdgePruneError, match="disk full") as info:
        compress(models["llama"], tmp_path / "out", _config(calib, reconstruct=False), sequential=True)
    assert "\n" not in str(info.value)
    assert len(shards) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging directory


@pytest.mark.parametrize("shard_bytes", [1, 10**9])
def test_shard_writer_streams_valid_safetensors(tmp_path, shard_bytes):
    """Tensors go to disk as they are added (nothing buffered) and the shards read back like save_file's."""
    from safetensors import safe_open

    from edgeprune.compress.sequential import ShardWriter

    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=gen), "b.bias": torch.randn(7, generator=gen),
               "c.scalar": torch.tensor(2.5), "d.ids": torch.arange(6).view(2, 3), "e.t": torch.randn(4, 6).T}
    writer = ShardWriter(tmp_path, shard_bytes, dtype=torch.bfloat16)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
        assert not any(isinstance(v, torch.Tensor) for v in writer.pending.values())  # on disk, not held
    writer.finish()
    files = sorted(tmp_path.iterdir())
    assert not [f for f in files if f.suffix == ".data"]
    if shard_bytes == 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(tensors) and len(set(index["weight_map"].values())) == 5
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    read = {}
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            read.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name


def test_auto_sequential_when_memory_is_short(tiny_models, tmp_path, monkeypatch, capsys):
    import psutil

    models, calib = tiny_models

    class Short:
        available = 1000  # bytes: nothing fits in memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Short())
    out = compress(models["llama"], tmp_path / "auto", _config(calib, reconstruct=False))
    assert "compressing block by block (--sequential)" in capsys.readouterr().err
    assert "sequential" in json.loads((out / "manifest.json").read_text())
