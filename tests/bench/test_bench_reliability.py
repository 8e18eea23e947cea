"""bench / pipeline / sweep never report success for a run that compared nothing, never leave partial
output, and refuse bad input before measuring (issue 13, items 5, 6, 7, 13, 15, 16, 20, 22, 23)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.core.artifacts import staged_output, write_manifest
from edgeprune import pipeline as pipeline_mod
from edgeprune.bench.harness import BenchConfig
from edgeprune.pipeline import SweepConfig, run_sweep
from edgeprune.cli import main
from edgeprune.core.errors import EdgePruneError


def one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("edgeprune: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def fake_pipeline(quality_ratios: dict[str, float | None], error: str = "quality worker died"):
    """A stand-in for run_pipeline that stages exports and a report, then calls the sweep's finish hook
    the way the real one does (inside the staging directory, before the manifest and the rename)."""
    seen = {}

    def run(pipeline, out, overwrite=False, threads=None, log=print, recipe_dir=None, finish=None, executor=None):
        with staged_output(out, overwrite) as tmp:
            for name in quality_ratios:
                (tmp / "exports" / name).mkdir(parents=True)
                (tmp / "exports" / name / "model.onnx").write_bytes(b"onnx" * 100)
            (tmp / "report").mkdir()
            models = [{"label": n, "quality": {"error": error} if q is None else {"value": q}}
                      for n, q in quality_ratios.items()]
            (tmp / "report" / "report.json").write_text(json.dumps({"models": models}))
            comparisons = [{"runtime": "onnxruntime", "batch": 1, "seq": 128, "model": n, "p50_ms": 10.0 / (i + 1),
                            "quality": q, "quality_ratio": q, "speedup_p50": i + 1.0, "flops_ratio": 1.0}
                           for i, (n, q) in enumerate(quality_ratios.items())]
            summary = {"comparisons": comparisons, "executor": {"timed_on": "localhost"}}
            finish(tmp, summary)
            seen["staged"] = sorted(p.name for p in tmp.iterdir())
            write_manifest(tmp, "pipeline", {})
        return summary

    return run, seen


SWEEP = SweepConfig(levels=(0.5,), bench=BenchConfig(threads=1, rounds=1))


def test_sweep_writes_its_choice_inside_the_staging_dir(tmp_path, monkeypatch):
    """Item 5: chosen/ and sweep.json are part of the atomic output (listed in its manifest)."""
    run, seen = fake_pipeline({"dense": 1.0, "prune-50": 0.99})
    monkeypatch.setattr(pipeline_mod, "run_pipeline", run)
    result = run_sweep(SWEEP, tmp_path / "out", min_quality=0.98)
    assert result["chosen"]["model"] == "prune-50"
    assert {"chosen", "sweep.json"} <= set(seen["staged"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "sweep.json" in manifest["files"] and "chosen/model.onnx" in manifest["files"]


def test_sweep_full_disk_while_copying_the_choice_leaves_nothing(tmp_path, monkeypatch):
    run, _ = fake_pipeline({"dense": 1.0, "prune-50": 0.99})
    monkeypatch.setattr(pipeline_mod, "run_pipeline", run)

    def full(src, dst, **kwargs):
        Path(dst).mkdir()
        (Path(dst) / "model.onnx").write_bytes(b"trunc")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(dst) / "model.onnx"))

    monkeypatch.setattr(shutil, "copytree", full)
    with pytest.raises(EdgePruneError, match="no space left"):
        run_sweep(SWEEP, tmp_path / "out", min_quality=0.98)
    assert list(tmp_path.iterdir()) == []


def test_sweep_refuses_when_quality_failed_for_every_model(tmp_path, monkeypatch):
    """Item 15: not 'no variant meets the budget' with exit 0."""
    run, _ = fake_pipeline({"dense": None, "prune-50": None})
    monkeypatch.setattr(pipeline_mod, "run_pipeline", run)
    with pytest.raises(EdgePruneError, match="no variant has a quality figure.*quality worker died"):
        run_sweep(SWEEP, tmp_path / "out", min_quality=0.98)
    assert list(tmp_path.iterdir()) == []


def test_sweep_budget_nothing_meets_exits_non_zero(tmp_path, monkeypatch, capsys):
    run, _ = fake_pipeline({"dense": 1.0, "prune-50": 0.5})
    monkeypatch.setattr(pipeline_mod, "run_pipeline", run)
    monkeypatch.setattr(pipeline_mod, "default_sweep", lambda: SWEEP)
    code = main(["sweep", "-o", str(tmp_path / "out"), "--min-quality", "1.2"])
    err = capsys.readouterr().err
    one_line_error(code, err, "no variant meets the budget", "--min-quality 1.2", "sweep.json")
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["chosen"] is None


@pytest.mark.parametrize("argv,needles", [
    (["sweep", "--max-latency-ms", "-5"], ("--max-latency-ms must be > 0",)),
    (["pipeline", "--threads", "0"], ("--threads must be >= 1",)),
    (["bench", "--dense", "d", "--candidate", "c", "--watts-per-core", "-1"], ("--watts-per-core must be > 0",)),
    (["bench", "--dense", "d", "--candidate", "c", "--eval-limit", "1"], ("--eval-limit must be >= 2",)),
    (["bench", "--dense", "d", "--candidate", "c", "--candidate", "e", "--label", "a"], ("--label given 1 times",)),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, argv, needles):
    """Items 7, 13, 15, 16: refused in well under a second, nothing written."""
    code = main(argv + ["-o", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert list(tmp_path.iterdir()) == []


def _fake_export(directory: Path, config: dict) -> str:
    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"")
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_bench_refuses_unrelated_models_and_too_long_sequences(tmp_path, capsys):
    """Items 13, 20: a BERT dense vs a GPT-2 candidate is no comparison; --seq past the position table is
    refused before any worker starts."""
    bert = _fake_export(tmp_path / "bert", {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512})
    gpt2 = _fake_export(tmp_path / "gpt2", {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024})
    code = main(["bench", "--dense", bert, "--candidate", gpt2, "-o", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, "gpt2", "bert", "own compressed or exported variants")
    code = main(["bench", "--dense", bert, "--candidate", bert, "--seq", "600", "-o", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, "--seq 600 exceeds the 512 token positions")
    assert not (tmp_path / "o").exists()


def test_bench_fails_when_no_candidate_could_be_measured(tiny_onnx, tmp_path, capsys):
    """Item 13: every candidate failing to load is an error, not a report of the dense model alone."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx["small"], broken)
    (broken / "model.onnx").write_bytes(b"not onnx")
    code = main(["bench", "--dense", str(tiny_onnx["dense"]), "--candidate", str(broken), "--seq", "8",
                 "--rounds", "1", "--warmup", "0", "--round-seconds", "0.01", "-o", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 2 and "no candidate could be measured" in captured.err and "broken" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_report_is_written_without_matplotlib(tmp_path, monkeypatch):
    """Item 23: report.json/report.md never depend on the plotting library; its absence is said once."""
    import importlib.util

    from edgeprune.bench import report as report_mod

    monkeypatch.setattr(report_mod, "check", lambda report: None)
    monkeypatch.setattr(report_mod, "markdown", lambda report: "# table\n")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    notes = []
    report = {"models": [{"label": "dense", "quality": {"value": 80.0}}], "comparisons": []}
    report_mod.write(report, tmp_path, notes.append)
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == []
    assert (tmp_path / "report.md").read_text() == "# table\n"
    assert len(notes) == 1 and "matplotlib is not installed" in notes[0]


def test_worker_exits_quietly_when_the_parent_goes_away(tmp_path):
    """Item 6: a worker whose parent was interrupted (broken pipe, or Ctrl-C to the process group) prints no
    traceback."""
    import signal

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune.bench.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(b'{"op": "memory"}\n')
    proc.stdin.flush()
    assert "no model loaded" in proc.stdout.readline().decode()  # serving: its signal setup is done
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the whole group
    proc.stdout.close()  # the parent is gone: the reply below hits a broken pipe
    proc.stdin.write(b'{"op": "memory"}\n')
    proc.stdin.flush()
    proc.stdin.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr, stderr


def test_bench_runs_on_a_runtime_only_install(tiny_onnx, tmp_path):
    """Item 23: no torch, transformers or matplotlib: bench still measures and writes its report."""
    block = ("import sys\nclass Absent:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'matplotlib'):\n"
             "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
             "sys.meta_path.insert(0, Absent())\nfrom edgeprune.cli import main\n")
    argv = ["bench", "--dense", str(tiny_onnx["dense"]), "--candidate", str(tiny_onnx["small"]), "--seq", "8",
            "--rounds", "1", "--warmup", "0", "--round-seconds", "0.01", "-o", str(tmp_path / "o")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", block + f"sys.exit(main({argv!r}))"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (tmp_path / "o" / "report.md").is_file() and len(report["comparisons"]) == 2
