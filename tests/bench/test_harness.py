"""The benchmark harness on tiny ONNX models: complete schema-checked report, real interleaving, timing
loops that consume outputs, labelled energy, decoder prefill/decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeprune.bench import energy
from edgeprune.bench.api import bench
from edgeprune.bench.harness import BenchConfig, rotated
from edgeprune.bench.report import SCHEMA_ID, validate
from edgeprune.core.onnxio import build_feeds, consume, timed_calls


@pytest.fixture(scope="module")
def encoder_report(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "enc"
    config = BenchConfig(batches=(1, 4), seqs=(64,), threads=1, rounds=4, warmup=2, round_seconds=0.03)
    bench(str(tiny_onnx["dense"]), [str(tiny_onnx["small"])], out, config, log=lambda m: None)
    return out, json.loads((out / "report.json").read_text())


def test_report_is_complete_and_schema_checked(encoder_report):
    out, report = encoder_report
    assert validate(report) == []
    assert report["schema"] == SCHEMA_ID
    env = report["environment"]
    assert env["cpu_model"] and env["threads"] == 1 and "onnxruntime" in env["libraries"]
    assert isinstance(env["cpu_flags"], list)
    labels = [m["label"] for m in report["models"]]
    assert labels == ["dense", "small"]
    for model in report["models"]:
        run = model["runs"][0]
        assert run["size"]["bytes"] > 0 and run["size"]["gzip_bytes"] > 0 and run["size"]["nonzeros"] > 0
        assert run["memory"]["peak_rss_bytes"] > run["memory"]["baseline_rss_bytes"] > 0
        assert {(x["batch"], x["seq"]) for x in run["latency"]} == {(1, 64), (4, 64)}
        for lat in run["latency"]:
            stats = lat["stats"]
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            assert lat["calls"] == stats["n"] == 4 * lat["calls_per_round"]
            assert stats["throughput_seq_s"] > 0
    dense_size = report["models"][0]["size"]["bytes"]
    assert report["models"][1]["size"]["bytes"] < dense_size  # the narrower FFN is a smaller file
    comps = [c for c in report["comparisons"] if c["model"] == "small"]
    assert len(comps) == 2 and all(c["speedup_p50"] > 0 and c["size_ratio"] < 1 for c in comps)
    for c in comps:  # paired per-round ratios: one per round, bracketing their median
        rounds = c["speedup_rounds"]
        assert rounds["rounds"] == 4 and rounds["min"] <= rounds["median"] <= rounds["max"]
    md = (out / "report.md").read_text()
    assert "| small |" in md and "speedup" in md and ("estimate" in md or "measured" in md)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "bench" and "report.json" in manifest["files"]


def test_work_scales_with_model_size(encoder_report):
    """A 16x narrower FFN must be measurably faster at batch 4: the timed calls really compute."""
    _, report = encoder_report
    comp = next(c for c in report["comparisons"] if c["model"] == "small" and c["batch"] == 4)
    assert comp["speedup_p50"] > 1.3


def test_interleaving_is_recorded_and_rotates(encoder_report):
    _, report = encoder_report
    order = [o for o in report["order"] if o["batch"] == 1]
    assert len(order) == 4 * 2
    by_round = {}
    for entry in order:
        by_round.setdefault(entry["round"], []).append(entry["model"])
    assert all(sorted(models) == ["dense", "small"] for models in by_round.values())
    firsts = [by_round[r][0] for r in sorted(by_round)]
    assert firsts == ["dense", "small", "dense", "small"]  # round r starts with model r mod n
    # executed in that order: timestamps never go back, and dense's blocks are not all contiguous
    stamps = [o["t"] for o in order]
    assert stamps == sorted(stamps)
    sequence = [o["model"] for o in order]
    assert sequence.index("small") < len(sequence) - 1 - sequence[::-1].index("dense")
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]


def test_timing_loop_consumes_every_output(encoder_report, tiny_onnx):
    """The recorded checksum equals (calls x) what consuming the real outputs gives, so every timed call's
    outputs were read; an optimised-away call would leave the checksum short."""
    import onnxruntime as ort

    _, report = encoder_report
    session = ort.InferenceSession(str(tiny_onnx["dense"] / "model.onnx"), providers=["CPUExecutionProvider"])

    class Info:
        def __init__(self, arg):
            self.name, self.shape, self.dtype = arg.name, arg.shape, "int64"

    feeds = build_feeds([Info(a) for a in session.get_inputs()], 4, 64, 50, seed=0)
    expected_one = consume(dict(zip(["last_hidden_state"], session.run(None, feeds))))
    lat = next(x for x in report["models"][0]["runs"][0]["latency"] if x["batch"] == 4)
    assert lat["checksum"] == pytest.approx(expected_one * lat["calls"], rel=1e-4)
    assert expected_one != 0


def test_timed_calls_counts_and_consumes():
    calls = []

    class Lazy:
        """An output whose value only exists when read: consuming it is what 'runs' the model."""

        def __init__(self, i):
            self.i = i

        def __array__(self, dtype=None, copy=None):
            calls.append(self.i)
            return np.array([self.i, 1.0])

    counter = iter(range(100))
    times, checksum = timed_calls(lambda feeds: {"y": Lazy(next(counter))}, {}, iterations=5, warmup=2)
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert calls == [0, 1, 2, 3, 4, 5, 6]  # warm-up and timed outputs were all materialised
    assert checksum == sum(i + 1.0 for i in range(2, 7))


def test_energy_method_is_labelled(encoder_report, tmp_path, monkeypatch):
    _, report = encoder_report
    method = report["energy_method"]
    meter = energy.EnergyMeter.open()
    assert method["method"] == ("measured" if meter.readable else "estimate")
    if method["method"] == "estimate":
        assert "assumed" in method["model"] and method["watts_per_core"] == 4.0
        lat = report["models"][0]["runs"][0]["latency"][0]
        assert lat["energy_j_per_inference"] == pytest.approx(lat["cpu_s_per_inference"] * 4.0)
    # a readable powercap counter is reported as a measurement, wrap-around handled
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    (domain / "energy_uj").write_text("1000\n")
    (domain / "max_energy_range_uj").write_text("5000\n")
    monkeypatch.setattr(energy, "POWERCAP_GLOB", str(tmp_path / "intel-rapl*" / "energy_uj"))
    fake = energy.EnergyMeter.open()
    assert fake.readable and energy.describe_method(fake, 4.0)["method"] == "measured"
    start = fake.read()
    (domain / "energy_uj").write_text("400\n")
    assert fake.delta_uj(start, fake.read()) == 4400
    assert energy.energy_per_inference({"method": "measured"}, 9.0, 4_000_000, 2) == 2.0


def test_decoder_prefill_and_decode(tiny_onnx, tmp_path):
    config = BenchConfig(batches=(1,), seqs=(8,), threads=1, rounds=2, warmup=1, round_seconds=0.02, new_tokens=3)
    report = bench(str(tiny_onnx["decoder"]), [str(tiny_onnx["decoder"])], tmp_path / "dec", config,
                   labels=["dense", "copy"], log=lambda m: None)
    assert validate(report) == []
    decode = report["models"][0]["runs"][0]["decode"]
    assert len(decode) == 1 and decode[0]["step"]["n"] == 2 * 3 and decode[0]["decode_tokens_s"] > 0
    assert decode[0]["prefill"]["n"] == 2
    kinds = [o["kind"] for o in report["order"]]
    assert kinds.count("decode") == 4 and kinds.count("forward") == 4
    comp = next(c for c in report["comparisons"] if c["model"] == "copy")
    assert comp["decode_speedup"] > 0 and comp["prefill_speedup"] > 0


def test_schema_check_catches_missing_fields(encoder_report):
    _, report = encoder_report
    broken = json.loads(json.dumps(report))
    del broken["models"][1]["runs"][0]["latency"][0]["stats"]["p99_ms"]
    broken["energy_method"]["method"] = "guess"
    problems = validate(broken)
    assert any("p99_ms" in p for p in problems) and any("guess" in p for p in problems)


def test_bad_inputs_fail_cleanly(tiny_onnx, tmp_path):
    from edgeprune.core.errors import EdgePruneError

    with pytest.raises(EdgePruneError, match="unknown runtime"):
        bench(str(tiny_onnx["dense"]), [], tmp_path / "x", BenchConfig(runtimes=("nope",)))
    with pytest.raises(EdgePruneError, match="needs --data"):
        BenchConfig(task="sts")
    assert not (tmp_path / "x").exists()


def test_cli_bench_and_errors(tiny_onnx, tmp_path, capsys):
    from edgeprune.cli import main

    out = tmp_path / "cli"
    rc = main(["bench", "--dense", str(tiny_onnx["dense"]), "--candidate", str(tiny_onnx["small"]), "--batch", "1",
               "--seq", "8", "--rounds", "2", "--warmup", "1", "--round-seconds", "0.01", "--threads", "1",
               "-o", str(out), "--json"])
    captured = capsys.readouterr().out
    assert rc == 0 and (out / "report.json").is_file()
    summary = json.loads(captured.strip().splitlines()[-1])
    assert {c["model"] for c in summary["comparisons"]} == {"dense", "small"}
    rc = main(["bench", "--dense", str(tiny_onnx["dense"]), "--candidate", str(tmp_path / "missing"),
               "-o", str(tmp_path / "cli2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing" in err[0]
    assert not (tmp_path / "cli2").exists()
    rc = main(["bench", "--dense", str(tiny_onnx["dense"]), "-o", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
