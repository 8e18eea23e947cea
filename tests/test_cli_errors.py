"""Bad input ends in one clear error line, a non-zero exit, and no output directory left behind."""

import json
import subprocess
import sys

import pytest

from edgeprune.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeprune: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(directory, name):
    return [p for p in directory.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")]


def test_missing_model_path(tmp_path, capsys):
    code, _, err = run_cli(["compress", tmp_path / "nope", "-o", tmp_path / "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, "not found")
    assert not leftovers(tmp_path, "out")


def test_unsupported_architecture(tmp_path, capsys):
    import transformers

    model = transformers.T5EncoderModel(transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                              d_kv=8, vocab_size=64))
    model.save_pretrained(tmp_path / "t5", safe_serialization=True)
    code, _, err = run_cli(["compress", tmp_path / "t5", "-o", tmp_path / "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, "unsupported architecture 't5'", "bert", "llama")
    assert not leftovers(tmp_path, "out")


@pytest.mark.parametrize("flag,value", [("--heads", "1.0"), ("--heads", "-0.1"), ("--ffn", "1.5")])
def test_ratio_out_of_range(tiny_models, tmp_path, capsys, flag, value):
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", tmp_path / "out", flag, value], capsys)
    assert_one_line_error(code, err, flag, "[0, 1)")
    assert not leftovers(tmp_path, "out")


@pytest.mark.parametrize("args,expected", [
    (["--allocation", "joint", "--importance", "fisher"], ("joint", "--flops-budget")),  # would prune nothing
    (["--allocation", "joint", "--flops-budget", "0.5"], ("needs unit interactions", "--importance fisher")),
])
def test_joint_allocation_needs_budget_and_fisher(tiny_models, tmp_path, capsys, args, expected):
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", tmp_path / "out", *args], capsys)
    assert_one_line_error(code, err, *expected)
    assert not leftovers(tmp_path, "out")


def test_existing_output_dir_needs_overwrite(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", out, "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left
    # --overwrite replaces only an edgeprune output: a folder of the user's files is refused (item 2)
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", out, "--heads", "0.5", "--overwrite"], capsys)
    assert_one_line_error(code, err, "not an edgeprune output", str(out))
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # empty: replaceable
    code, _, _ = run_cli(["compress", tiny_models("bert"), "-o", out, "--heads", "0.5", "--overwrite"], capsys)
    assert code == 0 and (out / "manifest.json").is_file()
    code, _, _ = run_cli(["compress", tiny_models("bert"), "-o", out, "--heads", "0.25", "--overwrite"], capsys)
    assert code == 0 and (out / "manifest.json").is_file()  # an edgeprune output: replaceable
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00garbage\xff", b""])
def test_unreadable_data_file(tiny_models, tmp_path, capsys, content):
    data = tmp_path / "data.tsv"
    if content is not None:
        data.write_bytes(content)
    code, _, err = run_cli(["eval", tiny_models("bert"), "--task", "sts", "--data", data], capsys)
    assert_one_line_error(code, err, str(data))


def test_pickle_weights_need_opt_in(tmp_path, capsys):
    import torch
    import transformers

    from tiny import tiny_config

    model = transformers.BertModel(tiny_config("bert"))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    code, _, err = run_cli(["compress", tmp_path / "bin", "-o", tmp_path / "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, "--allow-pickle")
    del torch


def test_hub_id_offline_gives_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-m", "edgeprune.cli", "compress", "some-org/some-model", "-o",
                             str(tmp_path / "out"), "--heads", "0.5"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hub" in lines[0] and "local directory" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_alias_fetch(capsys):
    code, _, err = run_cli(["models", "fetch", "no-such-model"], capsys)
    assert_one_line_error(code, err, "unknown model alias")


def test_eval_json_last_line(tiny_models, tmp_path, capsys):
    data = tmp_path / "sts.tsv"
    rows = ["g\tf\t2012\t%04d\t%.1f\t%s\t%s" % (i, i % 5, a, b) for i, (a, b) in enumerate(
        [("a man plays guitar", "a man plays music"), ("the dog runs", "a cat sits"),
         ("a child rides a horse", "the child rides"), ("red car", "blue car"), ("one big tree", "the sky")])]
    data.write_text("\n".join(rows) + "\n")
    code, out, _ = run_cli(["eval", tiny_models("bert"), "--task", "sts", "--data", data, "--json"], capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["task"] == "sts" and result["n"] == 5 and -100 <= result["value"] <= 100
