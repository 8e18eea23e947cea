"""compress without a recipe: the measured-best settings per family when --calib is given, --heads/--ffn as
a FLOPs budget for the joint search, built-in recipes by name, and the warning for a harmful combination."""

import argparse
import json

import pytest

from edgeprune.cli import build_parser, main
from edgeprune.compress.cli import config_from_args
from edgeprune.core.recipe_catalog import list_recipes, resolve_recipe

from tiny import sample_texts


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(t for t in sample_texts(64, seed=3) if len(t) > 20) + "\n")
    return path


def parse(*args) -> argparse.Namespace:
    return build_parser().parse_args(["compress", *map(str, args)])


def test_calib_turns_on_the_encoder_best_settings(tiny_models, calib_file):
    cfg = config_from_args(parse(tiny_models("bert"), "-o", "x", "--heads", "0.5", "--ffn", "0.5", "--calib", calib_file))
    s, rc = cfg.structured, cfg.reconstruct
    assert (s.importance, s.allocation, s.round_to, s.seq_len, s.gqa_mode) == ("fisher", "joint", 4, 128, "within")
    assert (rc.enabled, rc.mode, rc.ridge) == (True, "scales", 1.0)
    assert cfg.calibration.samples == 2048


def test_decoder_best_settings_and_flags_win(tiny_models, calib_file):
    cfg = config_from_args(parse(tiny_models("llama"), "-o", "x", "--heads", "0.34", "--calib", calib_file,
                                 "--round-to", "8", "--no-reconstruct"))
    assert (cfg.structured.gqa_mode, cfg.structured.seq_len, cfg.calibration.samples) == ("groups", 1, 256)
    assert cfg.structured.round_to == 8 and not cfg.reconstruct.enabled


def test_without_calib_the_data_free_defaults_stay(tiny_models):
    cfg = config_from_args(parse(tiny_models("bert"), "-o", "x", "--heads", "0.5"))
    assert (cfg.structured.importance, cfg.structured.allocation, cfg.structured.round_to) == ("magnitude", "uniform", 1)
    assert not cfg.reconstruct.enabled


def test_finetune_defaults_to_distillation(tiny_models, calib_file):
    cfg = config_from_args(parse(tiny_models("bert"), "-o", "x", "--finetune", calib_file))
    assert cfg.finetune.distill and cfg.finetune.learning_rate == 1e-4
    assert not config_from_args(parse(tiny_models("bert"), "-o", "x", "--finetune", calib_file,
                                      "--no-distill")).finetune.distill


def test_heads_ffn_become_the_flops_budget_of_their_uniform_cut(tiny_models, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_models("bert")), "-o", str(out), "--heads", "0.5", "--ffn", "0.5",
                 "--calib", str(calib_file), "--calib-samples", "16"])
    assert code == 0, capsys.readouterr().err
    recipe = (out / "recipe.yaml").read_text()
    plan = json.loads((out / "plan.json").read_text())
    # tiny bert: 4 heads x 8 + 48 neurons per layer; 2 of 4 heads and 24 of 48 neurons keep exactly half
    assert plan["meta"]["flops_budget_from_fractions"] == 0.5
    assert "flops_budget: 0.5" in recipe and "allocation: joint" in recipe
    assert plan["meta"]["kept_block_flops"] <= 0.5 * plan["meta"]["dense_block_flops"]
    assert all(layer["ffn"] % 4 == 0 for layer in plan["kept"])


def test_full_reconstruct_on_an_encoder_warns_with_the_measured_effect(tiny_models, calib_file, tmp_path, capsys):
    code = main(["compress", str(tiny_models("bert")), "-o", str(tmp_path / "o"), "--heads", "0.5",
                 "--calib", str(calib_file), "--calib-samples", "16", "--reconstruct-mode", "full"])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning" in err and "57.52" in err and "scales" in err


def test_builtin_recipes_by_name_with_measured_results():
    names = {r["name"]: r for r in list_recipes()}
    assert {"minilm-50-posttraining", "minilm-50-distill", "minilm-unstructured-90", "smollm2-25-distill"} <= set(names)
    assert all(r["measured"] != "not measured" for r in names.values())
    assert resolve_recipe("minilm-50-distill").endswith("minilm-50-distill.yaml")
    cfg = config_from_args(parse("minilm", "-o", "x", "--recipe", "minilm-50-distill"))
    assert (cfg.calibration.path, cfg.finetune.data, cfg.finetune.distill) == ("stsb:train", "stsb:train", True)


def test_unknown_recipe_name_is_one_line(tmp_path, capsys):
    code = main(["compress", "minilm", "-o", str(tmp_path / "o"), "--recipe", "no-such-recipe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "minilm-50-distill" in err[0]
