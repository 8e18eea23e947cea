"""Calibrated importance (fisher, taylor, activation), the mask hooks they rely on, and calibration loading."""

import copy

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig
from edgeprune.compress.calibration import load_calibration, load_texts
from edgeprune.compress.importance import NEEDS_CALIBRATION, UnitMasks, get_importance
from edgeprune.compress.plan import StructuredConfig, uniform_allocation
from edgeprune.compress.surgery import mask_plan
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import sample_texts

CALIBRATED = ("fisher", "taylor", "activation")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    # lines must be > 20 characters to count as sentences
    path.write_text("\n".join(t for t in sample_texts(64, seed=3) if len(t) > 20) + "\n")
    return path


def batches(loaded, path, samples=16):
    return load_calibration(loaded, CalibrationConfig(path=str(path), samples=samples, max_length=32, batch_size=8))


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])  # Linear, Conv1D, GQA layouts
@pytest.mark.parametrize("criterion", CALIBRATED)
def test_calibrated_criteria_score_every_unit(tiny_models, family, calib_file, criterion):
    loaded = load_model(tiny_models(family))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    scores = get_importance(criterion)(loaded.model, loaded.adapter, batches(loaded, calib_file))
    shapes = loaded.adapter.shapes(loaded.model.config)
    assert criterion in NEEDS_CALIBRATION
    for i, shape in enumerate(shapes):
        assert scores.heads[i].shape == (shape.heads,)
        assert scores.kv_heads[i].shape == (shape.kv_heads,)
        assert scores.neurons[i].shape == (shape.ffn,)
        for s in (scores.heads[i], scores.neurons[i]):
            assert torch.isfinite(s).all() and (s >= 0).all() and s.max() > 0
            assert s.std() > 0  # random weights: units must differ
    # scoring must leave the model untouched (no hooks or masks left behind)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in loaded.model.modules())


def test_unit_masks_equal_physical_masking(tiny_models, family):
    """Zero masks on dropped units reproduce mask_plan: the hooks act exactly on the units' inputs."""
    loaded = load_model(tiny_models(family))
    plan = uniform_allocation(get_importance("magnitude")(loaded.model, loaded.adapter),
                              loaded.adapter.shapes(loaded.model.config), StructuredConfig(heads=0.5, ffn=0.5),
                              loaded.adapter, loaded.model.config)
    reference = copy.deepcopy(loaded.model)
    mask_plan(reference, loaded.adapter, plan)
    batch = loaded.tokenizer(sample_texts(4), padding=True, return_tensors="pt")
    masks = UnitMasks(loaded.model, loaded.adapter)
    masks.reset(requires_grad=False)
    for i, layer_plan in enumerate(plan.layers):
        keep_h = torch.zeros_like(masks.heads[i])
        keep_h[list(layer_plan.keep_heads)] = 1
        keep_n = torch.zeros_like(masks.neurons[i])
        keep_n[list(layer_plan.keep_neurons)] = 1
        masks.heads[i], masks.neurons[i] = keep_h, keep_n
    with torch.no_grad(), masks:
        out = loaded.model(**batch)
    ref = reference(**batch)
    key = "logits" if hasattr(out, "logits") else "last_hidden_state"
    assert torch.allclose(getattr(out, key), getattr(ref, key), atol=1e-5)


def test_fisher_is_deterministic_and_zero_for_dead_neurons(tiny_models, calib_file):
    loaded = load_model(tiny_models("bert"))
    _, ffn_out = loaded.adapter.unit_consumers(loaded.model, 0)
    with torch.no_grad():
        ffn_out.tensor[:, 3] = 0  # neuron 3 of layer 0 can no longer affect anything
    calib = batches(loaded, calib_file)
    first = get_importance("fisher")(loaded.model, loaded.adapter, calib)
    second = get_importance("fisher")(loaded.model, loaded.adapter, calib)
    assert torch.equal(first.neurons[0], second.neurons[0])
    assert first.neurons[0][3] == 0 and first.neurons[0].max() > 0
    assert get_importance("activation")(loaded.model, loaded.adapter, calib).neurons[0][3] == 0


def test_calibration_sources_and_errors(tiny_models, tmp_path, calib_file):
    loaded = load_model(tiny_models("bert"))
    a = batches(loaded, calib_file, samples=10)
    b = batches(loaded, calib_file, samples=10)
    assert sum(x["input_ids"].shape[0] for x in a) == 10
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))  # seeded sampling
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t2012\t1\t4.0\tthe man plays a guitar\tthe woman plays music\n")
    assert load_texts(sts) == ["the man plays a guitar", "the woman plays music"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "the dog runs in the park"}\n{"text": "a cat sits on the table"}\n')
    assert load_texts(jsonl) == ["the dog runs in the park", "a cat sits on the table"]
    with pytest.raises(EdgePruneError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(EdgePruneError, match="--calib"):
        load_texts(None)
    decoder = load_model(tiny_models("llama"))
    windows = load_calibration(decoder, CalibrationConfig(path=str(calib_file), samples=4, max_length=16, batch_size=2))
    assert [tuple(w["input_ids"].shape) for w in windows] == [(2, 16), (2, 16)]
