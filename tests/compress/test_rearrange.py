"""Mask rearrangement (Kwon et al. 2022): same per-layer counts, units re-chosen by joint Fisher cost."""

import itertools
import json

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig, CompressConfig, compress
from edgeprune.compress.calibration import load_calibration
from edgeprune.compress.importance import get_importance
from edgeprune.compress.plan import StructuredConfig, _jointly_cheapest_removal, get_allocation, rearrange_plan
from edgeprune.errors import EdgePruneError
from edgeprune.models import load_model
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
