"""Depth pruning on tiny random models of every family: whole blocks and attention/FFN sublayers removed,
reloaded, compared with a hand-built reference (decoders: the dense model with the removed sublayers'
output projections zeroed; encoders: the dense modules called by hand), criteria, KV-cache generation,
width + depth in one plan, and every bad input as one error line."""

from __future__ import annotations

import json

import pytest
import torch

import edgeprune
from edgeprune.cli import main
from edgeprune.compress.api import CompressConfig, StructuredConfig, compress
from edgeprune.compress.depth import DepthConfig, block_influence, calibration_loss
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import FAMILIES, make_tiny, sample_texts

DECODERS = ("gpt2", "llama", "qwen2")
PLAN = dict(drop_layers=(1,), drop_attn=(2,), drop_ffn=(3,))  # blocks 0 and 4 stay whole


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Factory: a saved tiny random model of ``family`` with 5 blocks (built once per module)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny(family, tmp_path_factory.mktemp(f"deep-{family}"), layers=5)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(sample_texts(64, seed=3)) + "\n")
    return path


IDS = torch.tensor([[7, 12, 9, 30, 41, 8, 15, 22, 60, 11]])


def _zeroed_reference(source, drop_blocks=(), drop_attn=(), drop_ffn=()):
    """A dense decoder whose removed sublayers output exactly zero: their output projections are zeroed.
    Pre-LN blocks add that zero to the residual, which is what removing them means."""
    model = load_model(source).model
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h
    with torch.no_grad():
        for i, block in enumerate(blocks):
            attn = getattr(block, "self_attn", None) or block.attn
            mlp = block.mlp
            attn_out = getattr(attn, "o_proj", None) or attn.c_proj
            mlp_out = getattr(mlp, "down_proj", None) or mlp.c_proj
            for wanted, module in ((i in drop_blocks or i in drop_attn, attn_out),
                                   (i in drop_blocks or i in drop_ffn, mlp_out)):
                if wanted:
                    module.weight.zero_()
                    if module.bias is not None:
                        module.bias.zero_()
    return model


def _encoder_reference(source, family, ids, drop_blocks=(), drop_attn=(), drop_ffn=()):
    """The dense encoder's own modules called by hand, skipping the removed sublayers."""
    model = load_model(source).model
    with torch.no_grad():
        if family == "distilbert":
            hidden = model.embeddings(ids)
            for i, layer in enumerate(model.transformer.layer):
                if i in drop_blocks:
                    continue
                if i not in drop_attn:
                    hidden = layer.sa_layer_norm(layer.attention(hidden, hidden, hidden, mask=None)[0]
                                                 + hidden)
                if i not in drop_ffn:
                    hidden = layer.output_layer_norm(layer.ffn(hidden) + hidden)
            return hidden
        hidden = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        for i, layer in enumerate(model.encoder.layer):
            if i in drop_blocks:
                continue
            if i not in drop_attn:
                hidden = layer.attention(hidden)[0]
            if i not in drop_ffn:
                hidden = layer.output(layer.intermediate(hidden), hidden)
        return hidden


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_sublayers_removed_reload_and_match_reference(deep, family, tmp_path):
    out = compress(deep(family), tmp_path / "d", CompressConfig(depth=DepthConfig(**PLAN)))
    loaded = edgeprune.load(out)
    config = loaded.model.config
    shapes = loaded.adapter.shapes(config)
    assert config.num_hidden_layers == 4 and len(loaded.adapter.layers(loaded.model)) == 4
    assert config.edgeprune_depth["kept_blocks"] == [0, 2, 3, 4]
    assert shapes[1].heads == shapes[1].kv_heads == 0 and shapes[2].ffn == 0
    assert all(s.heads and s.ffn for s in (shapes[0], shapes[3]))
    plan = json.loads((out / "plan.json").read_text())["depth"]
    assert plan["drop_blocks"] == [1] and plan["drop_attention"] == [2] and plan["drop_ffn"] == [3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["depth"]["kept_blocks"] == [0, 2, 3, 4]
    dense = load_model(deep(family)).model
    removed = sum(p.numel() for b in (1,) for p in loaded.adapter.layers(dense)[b].parameters())
    assert manifest["parameters"] < manifest["dense_parameters"] - removed  # the sublayers went too
    got = _output(loaded.model, IDS)
    if family in DECODERS:
        ref = _output(_zeroed_reference(deep(family), (1,), (2,), (3,)), IDS)
    else:
        ref = _encoder_reference(deep(family), family, IDS, (1,), (2,), (3,))
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    # the analytic count (what reports and FLOPs use) agrees with the real one
    from edgeprune.compress.surgery import analytic_parameter_count, parameter_count

    dense_loaded = load_model(deep(family))
    full = analytic_parameter_count(dense_loaded.adapter, dense_loaded.model.config, parameter_count(dense),
                                    dense_loaded.adapter.dense_shapes(dense_loaded.model.config))
    kept = [s for i, s in enumerate(dense_loaded.adapter.dense_shapes(dense_loaded.model.config)) if i != 1]
    kept[1], kept[2] = type(kept[1])(0, 0, kept[1].ffn), type(kept[2])(kept[2].heads, kept[2].kv_heads, 0)
    per_block = [dense_loaded.adapter.block_params(dense_loaded.model.config, s) for s in kept]
    blocks_real = sum(p.numel() for layer in loaded.adapter.layers(loaded.model) for p in layer.parameters())
    assert full == parameter_count(dense) and sum(per_block) == blocks_real


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_generation_with_attention_free_block(deep, family, tmp_path):
    """Attention layers are renumbered into contiguous cache slots, so cached decoding equals uncached."""
    out = compress(deep(family), tmp_path / "d", CompressConfig(depth=DepthConfig(drop_attn=(0, 3), drop_layers=(1,))))
    model = edgeprune.load(out).model
    with torch.no_grad():
        cached = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        ref = _zeroed_reference(deep(family), (1,), (0, 3)).generate(IDS[:, :4], max_new_tokens=6, do_sample=False,
                                                                       use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain) and torch.equal(plain, ref)


def test_width_and_depth_in_one_plan(deep, calib_file, tmp_path):
    from edgeprune.compress.plan import PrunePlan
    from edgeprune.compress.surgery import mask_plan

    cfg = CompressConfig(structured=StructuredConfig(heads=0.34, ffn=0.25, gqa_mode="groups"),
                         depth=DepthConfig(drop_layers=(3,), drop_ffn=(1,)))
    out = compress(deep("llama"), tmp_path / "wd", cfg)
    loaded = edgeprune.load(out)
    plan = PrunePlan.load(out / "plan.json")
    assert plan.depth.drop_blocks == (3,) and plan.depth.drop_ffn == (1,)
    shapes = loaded.adapter.shapes(loaded.model.config)
    assert [s.kv_heads for s in shapes] == [1, 1, 1, 1] and shapes[1].ffn == 0 and shapes[0].ffn == 36
    # reference: dense, width units masked, then the removed sublayers zeroed
    ref_model = _zeroed_reference(deep("llama"), (3,), (), (1,))
    mask_plan(ref_model, load_model(deep("llama")).adapter, plan)
    assert torch.allclose(_output(loaded.model, IDS), _output(ref_model, IDS), atol=1e-5)


@pytest.mark.parametrize("criterion", ["bi", "ppl", "ppl-iterative", "taylor"])
def test_fraction_removes_the_least_important_blocks(deep, calib_file, criterion, tmp_path):
    cfg = CompressConfig(depth=DepthConfig(layers=0.4, attn_layers=0.2, importance=criterion),
                         calibration=CompressConfig().calibration.replace(path=str(calib_file), samples=8,
                                                                          max_length=16))
    out = compress(deep("llama"), tmp_path / "f", cfg)
    depth = json.loads((out / "plan.json").read_text())["depth"]
    assert len(depth["drop_blocks"]) == 2 and len(depth["drop_attention"]) == 1
    assert not set(depth["drop_attention"]) & set(depth["drop_blocks"])
    block = depth["meta"]["block"]
    if criterion == "ppl-iterative":
        assert len(block["steps"]) == 2 and sorted(block["order"]) == depth["drop_blocks"]
        first = block["steps"][0]["scores"]
        assert block["order"][0] == min(first, key=lambda k: (first[k], int(k)))
    else:
        scores = {int(k): v for k, v in block["scores"].items()}
        assert depth["drop_blocks"] == sorted(sorted(scores, key=lambda i: (scores[i], i))[:2])
    assert edgeprune.load(out).model.config.num_hidden_layers == 3


def test_block_influence_and_ppl_by_hand(deep, calib_file):
    from edgeprune.compress.calibration import load_calibration

    loaded = load_model(deep("llama"))
    calib = load_calibration(loaded, CompressConfig().calibration.replace(path=str(calib_file), samples=4,
                                                                          max_length=16))
    scores = block_influence(loaded.model, loaded.adapter, calib)
    batch = calib[0]
    with torch.no_grad():
        states = loaded.model(**batch, output_hidden_states=True).hidden_states
    for i in range(4):  # the last entry of hidden_states has the final norm applied
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)
        by_hand = float((1 - cos).mean()) if len(calib) == 1 else None
        if by_hand is not None:
            assert abs(float(scores["block"][i]) - by_hand) < 1e-5
    assert (scores["block"] >= 0).all() and (scores["attention"] > 0).all() and (scores["ffn"] > 0).all()
    # ppl of the model without block 2 == ppl of the zeroed reference
    from edgeprune.compress.depth import bypassed

    with bypassed(loaded.adapter, loaded.model, blocks=[2]):
        without = calibration_loss(loaded.model, loaded.adapter, calib)
    ref = _zeroed_reference(deep("llama"), (2,))
    total = count = 0
    with torch.no_grad():
        for b in calib:
            out = ref(**b, labels=b["input_ids"])
            n = b["input_ids"].numel() - b["input_ids"].shape[0]
            total, count = total + float(out.loss) * n, count + n
    assert abs(without - float(torch.exp(torch.tensor(total / count)))) < 1e-3 * without


def test_encoder_criteria_and_hidden_distillation_mapping(deep, calib_file, tmp_path):
    from edgeprune.compress.finetune import teacher_layers

    cfg = CompressConfig(depth=DepthConfig(layers=0.4, importance="ppl"),
                         calibration=CompressConfig().calibration.replace(path=str(calib_file), samples=8))
    out = compress(deep("bert"), tmp_path / "e", cfg)
    student = edgeprune.load(out).model
    teacher = load_model(deep("bert")).model
    kept = student.config.edgeprune_depth["kept_blocks"]
    assert len(kept) == 3 and teacher_layers(student, teacher) == kept
    # compressing the artifact again composes the record
    again = compress(out, tmp_path / "e2", CompressConfig(depth=DepthConfig(drop_layers=(0,))))
    twice = edgeprune.load(again).model
    assert twice.config.edgeprune_depth["kept_blocks"] == kept[1:]
    assert teacher_layers(twice, student) == [1, 2]


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--layers", "1.0"], "--layers must be in [0, 1)"),
    (["--layers", "-0.1"], "--layers must be in [0, 1)"),
    (["--layers", "0.95", "--calib", "CALIB"], "removes all 5 blocks"),
    (["--layers", "0.05", "--calib", "CALIB"], "removes nothing from 5 blocks"),
    (["--drop-layers", "0,1,2,3,4"], "removes all 5 blocks"),
    (["--drop-layers", "7"], "names block 7, but the model has 5 blocks (0-4)"),
    (["--drop-attn", "5"], "--drop-attn names block 5"),
    (["--drop-layers", "2,2"], "--drop-layers names block 2 more than once"),
    (["--drop-layers", "a,b"], "expected block indices like 3,5,7"),
    (["--drop-attn", "1", "--drop-ffn", "1"], "use --drop-layers 1"),
    (["--drop-layers", "1", "--drop-ffn", "1"], "is in --drop-layers and --drop-ffn"),
    (["--layers", "0.4", "--drop-layers", "1"], "not both"),
    (["--layers", "0.4"], "pass --calib DATA"),
    (["--drop-layers", "1", "--sequential"], "drop --sequential"),
    (["--drop-layers", "0,1,2", "--drop-attn", "3,4"], None),  # allowed: two blocks keep their FFN
    (["--drop-layers", "0,1,2", "--attn-layers", "0.6", "--calib", "CALIB"], "only 2 blocks remain"),
])
def test_bad_input_is_one_line_and_writes_nothing(deep, calib_file, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    flags = [str(calib_file) if f == "CALIB" else f for f in flags]
    if message is None:
        assert main(["compress", str(deep("llama")), "-o", str(out), *flags]) == 0
        return
    try:
        code = main(["compress", str(deep("llama")), "-o", str(out), *flags])
    except SystemExit as exc:  # argparse: usage line + error line
        code = exc.code
    assert code != 0
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("usage:")
           and not line.startswith(" ")]
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert not out.exists()


def test_gpt2_scaled_by_block_index_is_refused(tmp_path):
    import transformers

    source = make_tiny("gpt2", tmp_path / "g", layers=3)
    config = transformers.AutoConfig.from_pretrained(source)
    config.scale_attn_by_inverse_layer_idx = True
    config.save_pretrained(source)
    with pytest.raises(EdgePruneError, match="scale_attn_by_inverse_layer_idx"):
        compress(source, tmp_path / "o", CompressConfig(depth=DepthConfig(drop_layers=(1,))))
