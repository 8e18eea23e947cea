"""Mask rearrangement (Kwon et al. 2022): same per-layer counts, units re-chosen by joint Fisher cost."""

import itertools
import json

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig, CompressConfig, compress
from edgeprune.compress.calibration import load_calibration
from edgeprune.compress.importance import get_importance
from edgeprune.compress.plan import StructuredConfig, get_allocation, rearrange_plan
from edgeprune.compress.plan.rearrange import _jointly_cheapest_removal
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import sample_texts


def removal_cost(fisher: torch.Tensor, kept: tuple[int, ...]) -> float:
    removed = torch.ones(fisher.shape[0])
    removed[list(kept)] = 0
    return float(removed @ fisher @ removed)


def test_joint_cost_beats_single_scores_when_units_interact():
    # Units 0 and 1 are singly cheapest but redundant with each other's damage (positive interaction):
    # removing both costs 1 + 1 + 2 * 1 = 4; removing 0 and 2 costs 2.5. Scores alone would remove 0 and 1.
    fisher = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.5]])
    kept = _jointly_cheapest_removal(fisher, keep=1)
    assert kept == (1,)
    best = min(itertools.combinations(range(3), 1), key=lambda k: removal_cost(fisher, k))
    assert removal_cost(fisher, kept) == removal_cost(fisher, best) == 2.5
    # without interactions it is exactly the single-score ranking
    diagonal = torch.diag(torch.tensor([3.0, 1.0, 2.0, 0.5]))
    assert _jointly_cheapest_removal(diagonal, keep=2) == (0, 2)


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(t for t in sample_texts(48, seed=5) if len(t) > 20) + "\n")
    return path


@pytest.mark.parametrize("family,gqa_mode", [("bert", "within"), ("llama", "groups"), ("llama", "within")])
def test_rearrangement_keeps_counts_and_lowers_joint_cost(tiny_models, calib_path, family, gqa_mode):
    loaded = load_model(tiny_models(family))
    model, adapter = loaded.model, loaded.adapter
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_path), samples=16, max_length=32, batch_size=8))
    scores = get_importance("fisher")(model, adapter, calib, interactions=True)
    for diag, block in zip(scores.neurons, scores.neuron_interactions):  # the block's diagonal is the score
        torch.testing.assert_close(block.diagonal(), diag)
    shapes = adapter.shapes(model.config)
    cfg = StructuredConfig(flops_budget=0.5, allocation="global", gqa_mode=gqa_mode, seq_len=32, rearrange=True)
    plan = get_allocation("global")(scores, shapes, cfg, adapter, model.config)
    rearranged = rearrange_plan(plan, scores, cfg)
    assert rearranged.shapes == plan.shapes and "rearranged_heads_neurons" in rearranged.meta
    for i, (before, after) in enumerate(zip(plan.layers, rearranged.layers)):
        adapter.validate_plan(after, shapes[i], i)
        block = scores.neuron_interactions[i]
        # (greedy carries no general guarantee; on these seeded layers it must not lose to scores alone)
        assert removal_cost(block, after.keep_neurons) <= removal_cost(block, before.keep_neurons) + 1e-9
        if gqa_mode == "within" and shapes[i].kv_heads != shapes[i].heads:
            assert after.keep_heads == before.keep_heads  # "within" rank slots are not rearranged


def test_compress_with_rearrange_and_bad_importance(tiny_models, calib_path, tmp_path):
    recipe = {"structured": {"importance": "fisher", "flops_budget": 0.5, "seq_len": 32, "rearrange": True},
              "calibration": {"path": str(calib_path), "samples": 16, "max_length": 32}}
    out = compress(tiny_models("bert"), tmp_path / "out", CompressConfig.from_dict(recipe))
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["meta"]["rearranged_heads_neurons"]) == len(plan["layers"])
    recipe["structured"]["importance"] = "magnitude"
    with pytest.raises(EdgePruneError, match="--rearrange needs"):
        compress(tiny_models("bert"), tmp_path / "bad", CompressConfig.from_dict(recipe))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family,gqa_mode", [("bert", "within"), ("gpt2", "within"), ("llama", "groups")])
@pytest.mark.parametrize("budget,round_to", [(0.5, 1), (0.7, 4)])
def test_joint_allocation_meets_budget_with_valid_plans(tiny_models, calib_path, family, gqa_mode, budget, round_to):
    from edgeprune.compress.surgery import apply_plan
    from edgeprune.core.anatomy import analytic_flops

    loaded = load_model(tiny_models(family))
    model, adapter = loaded.model, loaded.adapter
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_path), samples=16, max_length=32, batch_size=8))
    scores = get_importance("fisher")(model, adapter, calib, interactions=True)
    shapes = adapter.shapes(model.config)
    cfg = StructuredConfig(flops_budget=budget, allocation="joint", gqa_mode=gqa_mode, seq_len=32, round_to=round_to)
    plan = get_allocation("joint")(scores, shapes, cfg, adapter, model.config)
    dense = analytic_flops(adapter, model.config, adapter.dense_shapes(model.config), 32)
    assert analytic_flops(adapter, model.config, plan.shapes, 32) <= budget * dense
    for i, (layer, shape) in enumerate(zip(plan.layers, shapes)):
        adapter.validate_plan(layer, shape, i)
        if round_to > 1 and len(layer.keep_neurons) > round_to:
            assert len(layer.keep_neurons) % round_to == 0
    apply_plan(model, adapter, plan)


def test_joint_allocation_uses_interactions_and_needs_its_inputs(tiny_models):
    from edgeprune.core.arch.bert import BertAdapter
    from edgeprune.compress.importance import Scores
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=4)
    adapter = BertAdapter()
    shapes = adapter.dense_shapes(config)
    heads = torch.diag(torch.tensor([5.0, 6.0, 7.0, 8.0])) * 1e9  # heads far too costly to remove
    # neurons 0 and 1 are singly the cheapest but their removals compound; 2 and 3 are independent
    neurons = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 9.0]])
    scores = Scores([heads.diagonal()], [heads.diagonal()], [neurons.diagonal()], comparable=True,
                    head_interactions=[heads], neuron_interactions=[neurons])
    # a budget that only neuron removals can meet: the plan drops 2 neurons and no head
    full = adapter.block_flops(config, shapes[0], 8)
    neuron = full - adapter.block_flops(config, type(shapes[0])(4, 4, 3), 8)
    cfg = StructuredConfig(flops_budget=(full - 2 * neuron) / full, allocation="joint", seq_len=8)
    plan = get_allocation("joint")(scores, shapes, cfg, adapter, config)
    assert plan.layers[0].keep_neurons == (1, 3) and len(plan.layers[0].keep_heads) == 4
    with pytest.raises(EdgePruneError, match="needs --flops-budget"):
        get_allocation("joint")(scores, shapes, StructuredConfig(allocation="joint"), adapter, config)
    scores.neuron_interactions = None
    with pytest.raises(EdgePruneError, match="interactions"):
        get_allocation("joint")(scores, shapes, cfg, adapter, config)


def test_interaction_memory_cap_fails_fast(tiny_models, calib_path, monkeypatch):
    import edgeprune.compress.importance as importance

    loaded = load_model(tiny_models("bert"))
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_path), samples=8, max_length=16, batch_size=8))
    monkeypatch.setattr(importance, "MAX_INTERACTION_BYTES", 1024)
    with pytest.raises(EdgePruneError, match="Fisher blocks would need"):
        get_importance("fisher")(loaded.model, loaded.adapter, calib, interactions=True)
