"""``report merge``: per-device column groups, refusal of reports that measured different things."""

import copy
import json
from pathlib import Path

import pytest

from edgeprune.bench import fleet
from edgeprune.cli import main

REPORT = Path(__file__).parents[2] / "benchmarks/results/2026-11-23-minilm-pipeline-s2-0240/report.json"


def write_report(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture
def two_devices(tmp_path):
    first = json.loads(REPORT.read_text())
    second = copy.deepcopy(first)
    second["environment"]["cpu_model"] = "Intel Xeon"
    for comp in second["comparisons"]:
        comp["p50_ms"] *= 2
        comp["speedup_rounds"]["median"] = 1.5
    return write_report(tmp_path / "amd", first), write_report(tmp_path / "intel", second), first


def test_merge_puts_each_device_in_its_own_columns(two_devices, tmp_path, capsys):
    amd, intel, first = two_devices
    assert main(["report", "merge", str(amd), str(intel / "report.json"), "-o", str(tmp_path / "fleet")]) == 0
    merged = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert [d["name"] for d in merged["devices"]] == ["AMD EPYC, 2 threads", "Intel Xeon, 2 threads"]
    assert len(merged["rows"]) == len(first["comparisons"])
    row = next(r for r in merged["rows"] if r["model"] != "dense")
    original = next(c for c in first["comparisons"] if c["model"] == row["model"] and c["runtime"] == row["runtime"])
    assert row["devices"]["AMD EPYC, 2 threads"]["p50_ms"] == pytest.approx(original["p50_ms"])
    assert row["devices"]["Intel Xeon, 2 threads"]["p50_ms"] == pytest.approx(2 * original["p50_ms"])
    assert row["devices"]["Intel Xeon, 2 threads"]["speedup"] == 1.5
    table = (tmp_path / "fleet" / "fleet.md").read_text()
    assert "AMD EPYC, 2 threads: speedup" in table and "Intel Xeon, 2 threads: p50 ms" in table
    assert (tmp_path / "fleet" / "fleet_speedup.png").stat().st_size > 0
    assert "| onnxruntime |" in capsys.readouterr().out


def test_same_cpu_twice_gets_distinct_names(two_devices):
    amd, _, _ = two_devices
    reports = [fleet.read_report(amd), fleet.read_report(amd)]
    assert [d["name"] for d in fleet.merge(reports)["devices"]] == ["AMD EPYC, 2 threads #1", "AMD EPYC, 2 threads #2"]
    assert [d["name"] for d in fleet.merge(reports, ["a", "b"])["devices"]] == ["a", "b"]


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["models"].pop(), "different models"),
    (lambda r: r["models"][1]["size"].update(bytes=1), "different files"),
    (lambda r: r["config"].update(seqs=[64]), "different settings"),
    (lambda r: r["config"].update(task="perplexity"), "task 'sts' vs 'perplexity'"),
])
def test_reports_of_different_things_are_refused(two_devices, tmp_path, capsys, change, expected):
    amd, _, first = two_devices
    other = copy.deepcopy(first)
    change(other)
    other_dir = write_report(tmp_path / "other", other)
    assert main(["report", "merge", str(amd), str(other_dir), "-o", str(tmp_path / "fleet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err
    assert not (tmp_path / "fleet").exists()


def test_bad_inputs_are_one_line(two_devices, tmp_path, capsys):
    amd, _, _ = two_devices
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for args, expected in ([[str(amd), str(tmp_path / "missing")], "report not found"],
                           [[str(amd), str(broken)], "not a readable report.json"],
                           [[str(amd)], "at least two reports"],
                           [[str(amd), str(amd), "--names", "x"], "1 names for 2 reports"]):
        assert main(["report", "merge", *args, "-o", str(tmp_path / "fleet")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "fleet").exists()
