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
    # progress lines ("[export] loading ...") are not errors
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[export] ")]
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


# --- issue 13: no data loss, no leftovers, no misleading success ---------------------------------------

def sts_file(path, rows=5):
    pairs = [("a man plays guitar", "a man plays music"), ("the dog runs", "a cat sits"),
             ("a child rides a horse", "the child rides"), ("red car", "blue car"), ("one big tree", "the sky")]
    path.write_text("\n".join("g\tf\t2012\t%04d\t%.1f\t%s\t%s" % (i, i % 5, a, b)
                              for i, (a, b) in enumerate(pairs[:rows])) + "\n")
    return path


def test_export_refuses_a_head_the_model_does_not_have(tiny_models, tmp_path, capsys):
    """Item 8: a base encoder exported as a classifier would carry random logits and still validate."""
    code, _, err = run_cli(["export", tiny_models("bert"), "-o", tmp_path / "out", "--task",
                            "sequence-classification"], capsys)
    assert_one_line_error(code, err, "no trained sequence-classification head", "classifier")
    assert not leftovers(tmp_path, "out")


def test_eval_refuses_tasks_the_model_cannot_do(tiny_models, tmp_path, capsys):
    """Item 9: an encoder on perplexity (random LM head) and a decoder on STS through PyTorch."""
    text = tmp_path / "wiki.txt"
    text.write_text("the man plays the guitar in the park every day\n" * 20)
    code, _, err = run_cli(["eval", tiny_models("bert"), "--task", "perplexity", "--data", text], capsys)
    assert_one_line_error(code, err, "no language-model head")
    code, _, err = run_cli(["eval", tiny_models("gpt2"), "--task", "sts", "--data", sts_file(tmp_path / "s.tsv")],
                           capsys)
    assert_one_line_error(code, err, "not a sentence encoder")


@pytest.mark.parametrize("args,needle", [
    (["--limit", "1"], "--limit must be >= 2"), (["--limit", "-5"], "--limit must be >= 2"),
    (["--threads", "0"], "--threads must be >= 1"), (["--batch-size", "0"], "--batch-size >= 1"),
])
def test_eval_numeric_flags(tiny_models, tmp_path, capsys, args, needle):
    """Items 14, 16."""
    code, _, err = run_cli(["eval", tiny_models("bert"), "--task", "sts", "--data", sts_file(tmp_path / "s.tsv"),
                            *args], capsys)
    assert_one_line_error(code, err, needle)


def test_eval_needs_two_sts_pairs(tiny_models, tmp_path, capsys):
    """Item 14: a Spearman correlation of one pair is not 0.0, it is undefined."""
    code, _, err = run_cli(["eval", tiny_models("bert"), "--task", "sts", "--data",
                            sts_file(tmp_path / "one.tsv", rows=1)], capsys)
    assert_one_line_error(code, err, "at least two", "one.tsv")


@pytest.mark.parametrize("args,needle", [
    (["--distill"], "--distill needs fine-tuning data"),
    (["--finetune", "{tmp}/missing.txt"], "fine-tuning data not found"),
    (["--finetune", "{tmp}/missing.txt", "--distill"], "fine-tuning data not found"),
    (["--recipe", "{tmp}/list.yaml"], "expected a mapping"),
    (["--recipe", "{tmp}/binary.yaml"], "not a text file"),
])
def test_compress_refuses_before_loading(tiny_models, tmp_path, capsys, args, needle):
    """Items 10, 18, 19: --distill alone did nothing yet recorded distill: true; a missing --finetune file
    was blamed on its format; a recipe that is a list or binary fell through to the catch-all."""
    (tmp_path / "list.yaml").write_text("- heads: 0.5\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    args = [a.format(tmp=tmp_path) for a in args]
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", tmp_path / "out", "--heads", "0.5", *args],
                           capsys)
    assert_one_line_error(code, err, needle)
    assert not leftovers(tmp_path, "out")


def test_calibration_records_what_was_used_and_warns(tiny_models, tmp_path, capsys):
    """Item 11: one calibration sentence is said out loud and recorded, not hidden behind the samples asked for."""
    calib = tmp_path / "calib.txt"
    calib.write_text("the man plays the guitar in the park every day\n")
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", tmp_path / "out", "--heads", "0.5",
                            "--importance", "activation", "--calib", calib], capsys)
    assert code == 0
    assert "warning: calibration used only 1 text(s)" in err and str(calib) in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["calibration"]["samples_used"] == 1 and manifest["calibration"]["samples_requested"] == 2048  # the encoder default with --calib


@pytest.mark.parametrize("args,needle", [
    (["--threads", "0"], "--threads must be >= 1"), (["--threads", "-3"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"), (["--batch-size", "-2"], "--batch-size must be >= 1"),
    (["--top-k", "-1"], "--top-k must be >= 0"), (["--max-length", "0"], "--max-length must be >= 2"),
    (["--max-length", "1"], "--max-length must be >= 2"), (["--max-length", "-5"], "--max-length must be >= 2"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_run_numeric_flags(tmp_path, capsys, args, needle):
    """Item 16: refused before the model loads (these were accepted and ignored, or overflowed)."""
    code, _, err = run_cli(["run", tmp_path / "any-export", "--text", "hello", *args], capsys)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("kind", ["binary", "device", "directory"])
def test_run_input_must_be_a_regular_text_file(tmp_path, capsys, kind):
    """Items 19, 21: /dev/zero was read until MemoryError; a binary file fell through to the catch-all."""
    path = {"binary": tmp_path / "x.bin", "device": "/dev/zero", "directory": tmp_path}[kind]
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    code, _, err = run_cli(["run", tmp_path / "any-export", "--input", path], capsys)
    assert_one_line_error(code, err, str(path))


def test_relative_path_with_one_slash_is_a_path_not_a_hub_id(tmp_path, capsys, monkeypatch):
    """Item 17: 'o/missing-model' with o a local folder is reported as a missing path, at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(["compress", "o/missing-model", "-o", "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, "model path not found: o/missing-model")


def test_offline_hub_id_fails_fast_without_offline_flag(tmp_path):
    """Item 17: no network and no HF_HUB_OFFLINE: one line within seconds, not 26 s of retries."""
    import os
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "https://127.0.0.1:9"  # nothing listens: what an offline device sees
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "edgeprune.cli", "compress", "some-org/some-model", "-o",
                             str(tmp_path / "out"), "--heads", "0.5"], capture_output=True, text=True, env=env,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "hub cannot be reached" in lines[0], result.stderr
    assert time.perf_counter() - started < 60  # torch import included; the hub part itself takes ~0 s


def test_damaged_weights_and_mismatched_config_name_the_model(tiny_models, tmp_path, capsys):
    """Item 19: corrupt safetensors and a config whose widths do not fit the weights: one line each."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("bert"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run_cli(["compress", broken, "-o", tmp_path / "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, str(broken), "damaged weights")
    widths = tmp_path / "widths"
    shutil.copytree(tiny_models("bert"), widths)
    config = json.loads((widths / "config.json").read_text())
    config["intermediate_size"] = 40
    (widths / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["compress", widths, "-o", tmp_path / "out", "--heads", "0.5"], capsys)
    assert_one_line_error(code, err, str(widths), "config.json does not match the weights")
    assert not leftovers(tmp_path, "out")


@pytest.mark.parametrize("out", ["/proc/foo/out", "{tmp}/afile.txt/sub"])
def test_unwritable_output_fails_before_loading(tiny_models, tmp_path, capsys, monkeypatch, out):
    """Items 19, 22: found before the model loads (it was found after compressing)."""
    import edgeprune.core.loading

    (tmp_path / "afile.txt").write_text("x")
    monkeypatch.setattr(edgeprune.core.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run_cli(["compress", tiny_models("bert"), "-o", out.format(tmp=tmp_path), "--heads", "0.5"],
                           capsys)
    assert_one_line_error(code, err, "output")


def test_export_reads_calibration_before_exporting(tiny_models, tmp_path, capsys, monkeypatch):
    """Item 22: an empty --calib for int8-static fails before the export and two validations."""
    from edgeprune.exporters import api

    (tmp_path / "empty.txt").write_text("\n\n")
    monkeypatch.setattr(api, "_prepare_from_model", lambda *a, **k: pytest.fail("exported before reading --calib"))
    code, _, err = run_cli(["export", tiny_models("bert"), "-o", tmp_path / "out", "--quantize", "int8-static",
                            "--calib", tmp_path / "empty.txt"], capsys)
    assert_one_line_error(code, err, "empty.txt", "no sentences")


def test_pipeline_validates_every_variant_before_building(tiny_models, tmp_path, monkeypatch):
    """Item 22: the third variant's bad ratio is found before the first variant is compressed."""
    from edgeprune import pipeline
    from edgeprune.compress import api as compress_api
    from edgeprune.core.errors import EdgePruneError

    config = pipeline.PipelineConfig.from_dict({"model": str(tiny_models("bert")), "task": None, "variants": [
        {"name": "dense"}, {"name": "ok", "compress": {"structured": {"heads": 0.5}}},
        {"name": "bad", "compress": {"structured": {"heads": 1.5}}}]})
    monkeypatch.setattr(compress_api, "compress", lambda *a, **k: pytest.fail("built a variant"))
    with pytest.raises(EdgePruneError, match=r"\[0, 1\)"):
        pipeline.run_pipeline(config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["compress", "export"])
def test_runtime_only_install_names_the_fix(tmp_path, verb):
    """Item 23: without torch, compress/export say which install brings it."""
    absent = ("import sys\nclass Absent:\n    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'datasets'):\n"
              "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
              "sys.meta_path.insert(0, Absent())\n")  # what a runtime-only install raises
    code = absent + f"from edgeprune.cli import main\nsys.exit(main(['{verb}', 'minilm', '-o', {str(tmp_path / 'out')!r}]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("[")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "pip install 'edgeprune[full]'" in lines[0] and "torch" in lines[0]
