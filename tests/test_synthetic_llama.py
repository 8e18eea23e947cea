"""benchmarks/tools/synthetic_llama.py writes a sharded checkpoint that transformers and edgeprune load."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[1] / "benchmarks/tools/synthetic_llama.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("synthetic_llama", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sharded_checkpoint_loads_with_the_counted_parameters(tool, tiny_models, tmp_path):
    import torch
    import transformers

    from edgeprune.core.loading import load_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models("llama"))
    shape = tool.Shape(hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2, vocab=len(tokenizer))
    info = tool.write_checkpoint(tmp_path / "synth", shape, tokenizer, "bfloat16", shard_bytes=40_000)
    index = json.loads((tmp_path / "synth" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert info["shards"] == len(shards) > 1 and all((tmp_path / "synth" / s).is_file() for s in shards)
    assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "synth", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == shape.parameters() == info["parameters"]
    loaded = load_model(str(tmp_path / "synth"), task="text-generation")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[5, 9, 10, 11]])).logits
    assert torch.isfinite(logits).all()
    assert not list(tmp_path.glob(".synth.tmp-*"))


def test_presets_have_the_advertised_sizes(tool):
    sizes = {name: tool.Shape(*dims, vocab=49152).parameters() / 1e9 for name, dims in tool.PRESETS.items()}
    assert 1.0 < sizes["1b"] < 1.3 and 2.8 < sizes["3b"] < 3.2 and 7.0 < sizes["8b"] < 7.6
