"""Physical pruning equals masking, parameter counts match the analytic formula, and artifacts reload."""

import copy

import pytest
import torch

from edgeprune.compress.api import CompressConfig, compress, structured_prune
from edgeprune.core.model_artifact import load_artifact
from edgeprune.compress.plan import StructuredConfig
from edgeprune.compress.surgery import mask_plan
from edgeprune.core.anatomy import analytic_parameter_count, parameter_count
from edgeprune.core.loading import load_model
from tiny import sample_texts, uneven_plan


def outputs(loaded, texts):
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("gqa_mode", ["within", "groups"])
def test_pruned_equals_masked_and_counts_match(tiny_models, family, gqa_mode):
    if gqa_mode == "groups" and family not in ("llama", "qwen2"):
        pytest.skip("GQA groups mode only differs for GQA models")
    loaded = load_model(tiny_models(family))
    reference = copy.deepcopy(loaded)
    dense_total = parameter_count(loaded.model)
    plan = structured_prune(loaded, StructuredConfig(heads=0.5, ffn=0.5, gqa_mode=gqa_mode))
    mask_plan(reference.model, reference.adapter, plan)

    texts = sample_texts(4)
    assert torch.allclose(outputs(loaded, texts), outputs(reference, texts), atol=1e-5, rtol=0)

    shapes = loaded.adapter.shapes(loaded.model.config)
    dense_shapes = loaded.adapter.dense_shapes(loaded.model.config)
    assert all(s.heads < d.heads and s.ffn < d.ffn for s, d in zip(shapes, dense_shapes))
    expected = analytic_parameter_count(loaded.adapter, loaded.model.config, dense_total, shapes)
    assert parameter_count(loaded.model) == expected < dense_total


def test_uneven_layers_save_and_reload(tiny_models, family, tmp_path):
    """Different head/neuron counts per layer survive save -> load with identical outputs."""
    from edgeprune.core.model_artifact import save_artifact
    from edgeprune.compress.surgery import apply_plan

    loaded = load_model(tiny_models(family))
    adapter = loaded.adapter
    plan = uneven_plan(loaded)
    apply_plan(loaded.model, adapter, plan)
    texts = sample_texts(3, seed=1)
    before = outputs(loaded, texts)
    save_artifact(tmp_path / "a", loaded, CompressConfig().to_dict(), None, plan=plan)
    reloaded = load_artifact(tmp_path / "a")
    assert adapter.shapes(reloaded.model.config) == plan.shapes
    assert len({s.heads for s in plan.shapes}) == 2  # really uneven
    assert torch.equal(outputs(reloaded, texts), before)


def test_compress_cli_roundtrip(tiny_models, tmp_path):
    from edgeprune.cli import main

    out = tmp_path / "pruned"
    assert main(["compress", str(tiny_models("bert")), "-o", str(out), "--heads", "0.5", "--ffn", "0.25"]) == 0
    loaded = load_artifact(out)
    assert [s.heads for s in loaded.adapter.shapes(loaded.model.config)] == [2, 2]
    assert [s.ffn for s in loaded.adapter.shapes(loaded.model.config)] == [36, 36]
    assert (out / "plan.json").is_file() and (out / "recipe.yaml").is_file() and (out / "manifest.json").is_file()
    recipe = CompressConfig.from_file(out / "recipe.yaml")
    assert recipe.structured.heads == 0.5


def test_round_to_keeps_multiples(tiny_models):
    loaded = load_model(tiny_models("llama"))
    structured_prune(loaded, StructuredConfig(ffn=0.3, round_to=8))
    assert all(s.ffn % 8 == 0 for s in loaded.adapter.shapes(loaded.model.config))


def test_never_removes_every_unit(tiny_models):
    loaded = load_model(tiny_models("bert"))
    structured_prune(loaded, StructuredConfig(heads=0.99, ffn=0.999))
    assert all(s.heads >= 1 and s.ffn >= 1 for s in loaded.adapter.shapes(loaded.model.config))


def test_compress_api_writes_manifest(tiny_models, tmp_path):
    out = compress(str(tiny_models("gpt2")), tmp_path / "g", CompressConfig(structured=StructuredConfig(heads=0.5)))
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "compress"
    assert manifest["parameters"] < manifest["dense_parameters"]
    assert "model.safetensors" in manifest["files"] and manifest["versions"]["torch"]
