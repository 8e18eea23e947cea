"""Global allocation: FLOPs budgets hold, every layer keeps a head and a neuron, GQA plans stay valid."""

import pytest
import torch

from edgeprune.core.arch.base import LayerShape
from edgeprune.compress.api import CompressConfig, compress
from edgeprune.compress.importance import Scores, get_importance
from edgeprune.compress.plan import StructuredConfig, get_allocation
from edgeprune.compress.surgery import apply_plan
from edgeprune.core.anatomy import analytic_flops
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model


def random_scores(shapes, seed=0, comparable=True):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(s.heads, generator=g) for s in shapes]
    kv = [h.view(s.kv_heads, -1).sum(1) for h, s in zip(heads, shapes)]
    return Scores(heads, kv, [torch.rand(s.ffn, generator=g) for s in shapes], comparable=comparable)


@pytest.mark.parametrize("family,gqa_mode", [("bert", "within"), ("gpt2", "within"), ("llama", "within"),
                                              ("llama", "groups"), ("qwen2", "groups")])
@pytest.mark.parametrize("budget", [0.45, 0.6, 0.85])
def test_flops_budget_holds_and_plan_is_valid(tiny_models, family, gqa_mode, budget):
    loaded = load_model(tiny_models(family))
    model, adapter = loaded.model, loaded.adapter
    shapes = adapter.shapes(model.config)
    cfg = StructuredConfig(flops_budget=budget, allocation="global", gqa_mode=gqa_mode, seq_len=64)
    plan = get_allocation("global")(random_scores(shapes), shapes, cfg, adapter, model.config)
    dense = analytic_flops(adapter, model.config, adapter.dense_shapes(model.config), 64)
    kept = analytic_flops(adapter, model.config, plan.shapes, 64)
    assert kept <= budget * dense
    assert plan.meta["kept_block_flops"] == kept
    for i, (layer_plan, shape) in enumerate(zip(plan.layers, shapes)):
        adapter.validate_plan(layer_plan, shape, i)  # >= 1 head and neuron, GQA grouping consistent
        if gqa_mode == "groups" and shape.kv_heads != shape.heads:
            group = shape.heads // shape.kv_heads
            assert len(layer_plan.keep_heads) == group * len(layer_plan.keep_kv_heads)
    apply_plan(model, adapter, plan)  # and surgery accepts it
    assert adapter.shapes(model.config) == plan.shapes


def test_budget_is_used_and_follows_scores():
    from edgeprune.core.arch.bert import BertAdapter
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
    adapter = BertAdapter()
    shapes = adapter.dense_shapes(config)
    scores = random_scores(shapes)
    scores.neurons[2] = scores.neurons[2] * 100  # layer 2's neurons matter most: keep all of them
    cfg = StructuredConfig(flops_budget=0.5, allocation="global", seq_len=16)
    plan = get_allocation("global")(scores, shapes, cfg, adapter, config)
    assert plan.shapes[2].ffn == 48
    dense = analytic_flops(adapter, config, shapes, 16)
    kept = analytic_flops(adapter, config, plan.shapes, 16)
    neuron_cost = adapter.block_flops(config, shapes[0], 16) - adapter.block_flops(
        config, LayerShape(4, 4, 47), 16)
    assert 0.5 * dense - neuron_cost < kept <= 0.5 * dense  # nothing left that would still fit


def test_global_fractions_and_round_to(tiny_models):
    loaded = load_model(tiny_models("bert"))
    model, adapter = loaded.model, loaded.adapter
    shapes = adapter.shapes(model.config)
    cfg = StructuredConfig(heads=0.5, ffn=0.5, allocation="global", round_to=4)
    plan = get_allocation("global")(get_importance("magnitude")(model, adapter), shapes, cfg, adapter, model.config)
    assert sum(s.heads for s in plan.shapes) == sum(s.heads for s in shapes) // 2
    assert all(s.ffn % 4 == 0 and s.ffn >= 4 and s.heads >= 1 for s in plan.shapes)


def test_budget_too_small_and_missing_budget():
    from edgeprune.core.arch.bert import BertAdapter
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    adapter = BertAdapter()
    shapes = adapter.dense_shapes(config)
    with pytest.raises(EdgePruneError, match="below the minimum"):
        get_allocation("global")(random_scores(shapes), shapes, StructuredConfig(flops_budget=0.01), adapter, config)
    with pytest.raises(EdgePruneError, match="needs --flops-budget"):
        get_allocation("flops_budget")(random_scores(shapes), shapes, StructuredConfig(heads=0.5), adapter, config)


def test_compress_with_flops_budget_records_fraction(tiny_models, tmp_path):
    import json

    out = compress(tiny_models("bert"), tmp_path / "out", CompressConfig.from_dict(
        {"structured": {"flops_budget": 0.5, "seq_len": 32}}))
    meta = json.loads((out / "plan.json").read_text())["meta"]
    assert meta["allocation"] == "flops_budget" and meta["kept_flops_fraction"] <= 0.5
