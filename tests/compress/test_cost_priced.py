"""The runtime-priced joint search (--cost-model): units are priced by the decode time a measured cost model
gives them, the search stops when the predicted speedups are reached, depth pruning of the same call is part
of the prediction, and bad combinations fail before any work."""

from __future__ import annotations

import json

import pytest

from edgeprune.compress import cost_model as cm
from edgeprune.compress.api import CalibrationConfig
from edgeprune.compress.calibration import load_calibration
from edgeprune.compress.depth import DepthPlan
from edgeprune.compress.importance import get_importance
from edgeprune.compress.plan import StructuredConfig, get_allocation
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import sample_texts


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(t for t in sample_texts(48, seed=5) if len(t) > 20) + "\n")
    return path


def cost_file(tmp_path, head_ms=0.05, neuron_ms=1e-4):
    # constant, layers, attention layers, query heads, FFN neurons (seconds); prefill = 8 x decode
    decode = (2e-3, 1e-4, 2e-4, head_ms * 1e-3, neuron_ms * 1e-3)
    model = cm.CostModel("llamacpp", 128, 2, tuple(8 * c for c in decode), decode,
                         cm.host_fingerprint(2), [], "2026-12-02T00:00:00Z", "dense.gguf")
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(model.to_dict()))
    return path, model


@pytest.fixture
def scored(tiny_models, calib_path):
    loaded = load_model(tiny_models("llama"))
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_path), samples=16, max_length=32, batch_size=8))
    scores = get_importance("fisher")(loaded.model, loaded.adapter, calib, interactions=True)
    return loaded, scores


def layout(shapes):
    return [(s.heads, s.kv_heads, s.ffn) for s in shapes]


def test_priced_search_reaches_the_predicted_speedup_and_records_it(scored, tmp_path):
    loaded, scores = scored
    model, adapter = loaded.model, loaded.adapter
    path, cost = cost_file(tmp_path)
    dense = layout(adapter.dense_shapes(model.config))
    cfg = StructuredConfig(allocation="joint", gqa_mode="groups", seq_len=1, cost_model=str(path),
                           decode_speedup=1.05)
    plan = get_allocation("joint")(scores, adapter.shapes(model.config), cfg, adapter, model.config)
    predicted = cost.speedup(layout(plan.shapes), dense)["decode"]
    assert predicted >= 1.05
    assert plan.meta["runtime_priced"]["predicted_speedup"]["decode"] == pytest.approx(predicted, abs=1e-3)
    assert predicted < 1.10  # it stops near the target, not at the most width pruning can do (1.107 here)
    for i, (layer, shape) in enumerate(zip(plan.layers, adapter.shapes(model.config))):
        adapter.validate_plan(layer, shape, i)


def test_prices_change_what_is_removed(scored, tmp_path):
    loaded, scores = scored
    model, adapter = loaded.model, loaded.adapter
    removed = {}
    for name, head_ms, neuron_ms in (("heads buy speed", 0.5, 1e-6), ("neurons buy speed", 1e-6, 0.02)):
        path, _ = cost_file(tmp_path, head_ms, neuron_ms)
        cfg = StructuredConfig(allocation="joint", gqa_mode="groups", seq_len=1, cost_model=str(path),
                               decode_speedup=1.05)
        plan = get_allocation("joint")(scores, adapter.shapes(model.config), cfg, adapter, model.config)
        dense = adapter.dense_shapes(model.config)
        removed[name] = (sum(d.heads - s.heads for d, s in zip(dense, plan.shapes)),
                         sum(d.ffn - s.ffn for d, s in zip(dense, plan.shapes)))
    # what the runtime says saves time is what the search removes (loss per millisecond, not per FLOP)
    assert removed["neurons buy speed"][0] == 0 < removed["heads buy speed"][0]
    assert removed["heads buy speed"][1] < removed["neurons buy speed"][1]


def test_depth_removed_blocks_count_and_are_left_alone(scored, tmp_path):
    loaded, scores = scored
    model, adapter = loaded.model, loaded.adapter
    path, cost = cost_file(tmp_path)
    shapes = adapter.shapes(model.config)
    depth = DepthPlan(len(shapes), drop_blocks=(0,))
    cfg = StructuredConfig(allocation="joint", gqa_mode="groups", seq_len=1, cost_model=str(path),
                           decode_speedup=1.05)
    plan = get_allocation("joint")(scores, shapes, cfg, adapter, model.config, depth_plan=depth)
    assert plan.shapes[0] == shapes[0]  # the dropped block is not width-pruned: no budget spent on it
    dense = layout(adapter.dense_shapes(model.config))
    assert cost.speedup(layout(plan.shapes)[1:], dense)["decode"] == pytest.approx(
        plan.meta["runtime_priced"]["predicted_speedup"]["decode"], abs=1e-3)


def test_bad_cost_model_options_fail_before_work(tmp_path):
    with pytest.raises(EdgePruneError, match="--cost-model"):
        StructuredConfig(allocation="joint", decode_speedup=1.3)
    with pytest.raises(EdgePruneError, match="--decode-speedup"):
        StructuredConfig(allocation="joint", cost_model="x.json")
    with pytest.raises(EdgePruneError, match="must be > 1"):
        StructuredConfig(allocation="joint", cost_model="x.json", decode_speedup=0.9)
    with pytest.raises(EdgePruneError, match="--allocation joint"):
        StructuredConfig(allocation="global", cost_model="x.json", decode_speedup=1.3)
    with pytest.raises(EdgePruneError, match="no such file"):
        cm.load_cost_model(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgePruneError, match="not a readable cost model"):
        cm.load_cost_model(tmp_path / "bad.json")


def test_unreachable_speedup_is_one_clear_error(scored, tmp_path):
    loaded, scores = scored
    model, adapter = loaded.model, loaded.adapter
    path, _ = cost_file(tmp_path)
    cfg = StructuredConfig(allocation="joint", gqa_mode="groups", seq_len=1, cost_model=str(path), decode_speedup=50.0)
    with pytest.raises(EdgePruneError, match="cannot be reached by width pruning"):
        get_allocation("joint")(scores, adapter.shapes(model.config), cfg, adapter, model.config)
