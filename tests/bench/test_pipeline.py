"""``edgeprune pipeline`` end to end on a tiny BERT (compress -> export -> bench with quality), and the
sweep's Pareto frontier / budget search."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgeprune.pipeline import PipelineConfig, choose, pareto_front, run_pipeline, sweep_pipeline, SweepConfig
from edgeprune.bench.report import validate
from edgeprune.core.errors import EdgePruneError

REPO = Path(__file__).resolve().parents[2]


def _sts_file(path, n=24):
    from tiny import sample_texts

    texts = sample_texts(2 * n, seed=3)
    rng = random.Random(0)
    rows = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.2f}\t{texts[2 * i]}\t{texts[2 * i + 1]}"
            for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_pipeline_tiny_recipe_end_to_end(tiny_models, tmp_path, capsys):
    model = tiny_models("bert")
    data = _sts_file(tmp_path / "sts.tsv")
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(f"""
model: {model}
task: sts
data: {data}
variants:
  - name: dense
  - name: pruned
    compress: {{structured: {{heads: 0.5, ffn: 0.5}}}}
  - name: pruned-int8
    reuse: pruned
    export: {{quantize: int8-dynamic}}
  - name: never-built
    reuse: dense
    requires_runtime: no-such-runtime
  - name: refused
    reuse: pruned
    export: {{quantize: int8-dynamic, min_cosine: 1.5}}
  - name: after-refused
    reuse: refused
    export: {{quantize: int8-dynamic}}
bench: {{batches: [2], seqs: [16], threads: 1, rounds: 2, warmup: 1, round_seconds: 0.02}}
""")
    config = PipelineConfig.from_file(recipe)
    logged: list[str] = []
    summary = run_pipeline(config, tmp_path / "out", log=logged.append)
    out = tmp_path / "out"
    report = json.loads((out / "report" / "report.json").read_text())
    assert validate(report) == []
    assert [m["label"] for m in report["models"]] == ["dense", "pruned", "pruned-int8"]
    assert "skipped" in summary["variants"]["never-built"]
    # a refused candidate (and what reuses it) is recorded and left out; the others are still benchmarked
    assert "below the threshold" in summary["variants"]["refused"]["failed"]
    assert summary["variants"]["after-refused"]["failed"] == "the variant it reuses, refused, failed"
    assert any(line.startswith("[refused] failed, left out of the benchmark") for line in logged)
    assert not (out / "exports" / "refused").exists()  # nothing half-written
    by = {c["model"]: c for c in report["comparisons"]}
    assert by["dense"]["quality_ratio"] == pytest.approx(1.0)
    assert by["pruned"]["flops_ratio"] > 1.5  # half the heads and neurons
    assert by["pruned"]["size_ratio"] < 1
    assert report["models"][2]["size"]["quantization"] == "int8-dynamic"  # tiny: scales outweigh the int8 savings
    for m in report["models"]:
        assert m["quality"]["n"] == 24 and m["quality"]["runtime"] == "onnxruntime"
        assert m["agreement"]["cosine_mean"] <= 1.0 + 1e-6
    assert (out / "report" / "latency_vs_quality.png").is_file() and (out / "report" / "size_vs_quality.png").is_file()
    assert (out / "pipeline.yaml").is_file() and json.loads((out / "manifest.json").read_text())["stage"] == "pipeline"
    printed = capsys.readouterr().out
    assert "| pruned-int8 |" in printed  # the table is printed
    assert "not benchmarked: refused: " in printed
    best = summary["best_tradeoff"]  # the fastest variant within 1 % of dense quality (or none)
    assert best is None or (best["quality_ratio"] >= 0.99 and best["model"] in by and "best trade-off" in printed)
    assert list(summary["best_by_kind"]) == ["onnxruntime fp32", "onnxruntime int8"]  # what the main job shows
    assert "best onnxruntime fp32: " in printed and "best onnxruntime int8: " in printed


def test_pipeline_config_errors(tmp_path):
    with pytest.raises(EdgePruneError, match="earlier variant"):
        PipelineConfig.from_dict({"variants": [{"name": "a", "reuse": "b"}, {"name": "b"}]})
    with pytest.raises(EdgePruneError, match="unknown option"):
        PipelineConfig.from_dict({"variants": [{"name": "a", "bogus": 1}]})
    with pytest.raises(EdgePruneError, match="at least one variant"):
        PipelineConfig.from_dict({})


def test_pareto_and_budget_search():
    points = [
        {"model": "dense", "p50_ms": 10.0, "quality_ratio": 1.0},
        {"model": "p25", "p50_ms": 7.0, "quality_ratio": 0.995},
        {"model": "p50", "p50_ms": 5.0, "quality_ratio": 0.985},
        {"model": "bad", "p50_ms": 6.0, "quality_ratio": 0.97},  # slower and worse than p50
        {"model": "p70", "p50_ms": 3.5, "quality_ratio": 0.93},
    ]
    assert [p["model"] for p in pareto_front(points)] == ["p70", "p50", "p25", "dense"]
    assert choose(points, 0.98, None)["model"] == "p50"
    assert choose(points, 0.999, None)["model"] == "dense"
    assert choose(points, None, 6.5)["model"] == "p50"
    assert choose(points, None, 3.0) is None
    assert choose(points, 0.99, 6.0) is None


def test_sweep_builds_levels_and_quantized_variants():
    pipeline = sweep_pipeline(SweepConfig(levels=(0.3, 0.6), quantize=("none", "int8-dynamic")))
    names = [v.name for v in pipeline.variants]
    assert names == ["dense", "dense-int8-dynamic", "prune-30", "prune-30-int8-dynamic", "prune-60",
                     "prune-60-int8-dynamic"]
    assert pipeline.variants[2].compress["structured"]["heads"] == 0.3


def test_sweep_end_to_end_returns_chosen_artifact(tiny_models, tmp_path, capsys):
    from edgeprune.cli import main

    data = _sts_file(tmp_path / "sts.tsv")
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"""
model: {tiny_models("bert")}
data: {data}
eval_limit: null
levels: [0.25, 0.5]
quantize: [none]
bench: {{batches: [2], seqs: [16], threads: 1, rounds: 2, warmup: 1, round_seconds: 0.02}}
""")
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "-o", str(out), "--min-quality", "0.0001", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p["model"] for p in result["points"]} == {"dense", "prune-25", "prune-50"}
    assert result["pareto"] and set(result["pareto"]) <= {"dense", "prune-25", "prune-50"}
    fastest = min(result["points"], key=lambda p: p["p50_ms"])
    assert result["chosen"]["model"] == fastest["model"]  # every variant passes a near-zero quality bar
    assert (out / "chosen" / "model.onnx").is_file() and (out / "sweep.json").is_file()


def test_best_tradeoff_is_the_fastest_within_one_percent():
    from edgeprune.pipeline import best_tradeoff

    rows = [{"runtime": "onnxruntime", "batch": 1, "seq": 128, "model": m, "p50_ms": p, "quality": q * 86.7,
             "quality_ratio": q, "speedup_p50": 9.0 / p} for m, p, q in
            [("dense", 9.0, 1.0), ("pt", 5.0, 0.986), ("pt-int8", 2.2, 0.985), ("kd", 5.1, 0.999),
             ("kd-int8", 2.3, 0.995)]]
    rows.append(dict(rows[3], runtime="deepsparse", p50_ms=1.0))  # other runtimes do not compete
    best = best_tradeoff(rows)
    assert best["model"] == "kd-int8" and best["runtime"] == "onnxruntime"
    assert best_tradeoff([dict(r, quality_ratio=0.9) for r in rows[1:]]) is None
    assert best_tradeoff([dict(r, quality_ratio=None) for r in rows]) is None


def test_default_pipeline_builds_the_distilled_variant_in_fp32_and_int8():
    from edgeprune.pipeline import default_recipe, variant_precisions

    config = default_recipe()
    by = {v.name: v for v in config.variants}
    assert list(by) == ["dense", "distilled-60", "distilled-60-fused", "distilled-60-fused-int8",
                        "distilled-60-ds-int8"]
    assert by["distilled-60"].recipe.endswith("minilm-60-distill.yaml")
    assert by["distilled-60-fused"].reuse == "distilled-60" and by["distilled-60-fused"].export["optimize"]
    assert by["distilled-60-fused-int8"].reuse == "distilled-60"
    assert by["distilled-60-fused-int8"].export == {"optimize": True, "quantize": "int8-dynamic"}
    ds = by["distilled-60-ds-int8"]  # built only where DeepSparse is installed
    assert ds.reuse == "distilled-60" and ds.requires_runtime == "deepsparse"
    assert ds.export == {"target": "deepsparse", "quantize": "int8-static", "calib": "stsb:train"}
    assert variant_precisions(config) == {"dense": "fp32", "distilled-60": "fp32", "distilled-60-fused": "fp32",
                                          "distilled-60-fused-int8": "int8", "distilled-60-ds-int8": "int8"}
    assert config.data == "stsb:dev" and "deepsparse" in config.optional_runtimes


def test_best_by_kind_shows_fp32_int8_and_each_further_runtime():
    from edgeprune.pipeline import best_by_kind

    def row(model, p50, quality, runtime="onnxruntime"):
        return {"runtime": runtime, "batch": 1, "seq": 128, "model": model, "p50_ms": p50, "quality": quality * 86.7,
                "quality_ratio": quality, "speedup_p50": 9.0 / p50, "speedup_rounds": {"median": 9.1 / p50}}

    rows = [row("dense", 9.0, 1.0), row("kd", 4.5, 0.995), row("kd-fast", 4.0, 0.97), row("kd-int8", 1.8, 0.992),
            row("dense", 8.0, 1.0, "deepsparse"), row("kd", 5.0, 0.995, "deepsparse"),
            dict(row("kd", 1.0, 0.995), seq=16)]  # another shape never competes
    precisions = {"dense": "fp32", "kd": "fp32", "kd-fast": "fp32", "kd-int8": "int8"}
    best = best_by_kind(rows, precisions)
    assert list(best) == ["onnxruntime fp32", "onnxruntime int8", "deepsparse"]
    assert best["onnxruntime fp32"]["model"] == "kd" and best["onnxruntime int8"]["model"] == "kd-int8"
    assert best["deepsparse"]["model"] == "kd" and best["deepsparse"]["runtime"] == "deepsparse"
    assert best["onnxruntime fp32"]["speedup_rounds_median"] == pytest.approx(9.1 / 4.5)
    assert best_by_kind([r for r in rows if r["model"] != "kd-int8"], precisions)["onnxruntime int8"] is None
    assert best_by_kind([], precisions) == {}


def test_deepsparse_int8_pipeline_exports_the_distilled_artifact_only():
    from edgeprune.pipeline import PipelineConfig, variant_configs

    config = PipelineConfig.from_file(REPO / "benchmarks" / "pipelines" / "minilm-deepsparse-int8.yaml")
    variant = {v.name: v for v in config.variants}["distilled-60-ds-int8"]
    assert variant.reuse == "distilled-60" and variant.requires_runtime == "deepsparse"
    _, export_config = variant_configs(config)["distilled-60-ds-int8"]
    assert (export_config.target, export_config.quantize, export_config.calib) == ("deepsparse", "int8-static", "stsb:train")


def test_unreachable_data_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import time

    from edgeprune.cli import main

    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code = main(["pipeline", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and time.perf_counter() - started < 5
    assert len(err) == 1 and "stsb:dev" in err[0] and "EDGEPRUNE_DATA" in err[0]
    assert not (tmp_path / "out").exists()
