"""``bench``: measure a dense model and candidates, write report.json / report.md / plots atomically."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeprune.bench.harness import (BenchConfig, BenchModel, agreement_vs_dense, environment, measure_quality,
                                     measure_runtime, prepare_models)
from edgeprune.core.errors import EdgePruneError


def _latency_entry(entry: dict, energy_method: dict) -> dict[str, Any]:
    from edgeprune.bench.energy import energy_per_inference
    from edgeprune.bench.metrics import latency_stats, round_medians_spread

    flat = [t for r in entry["rounds"] for t in r]
    calls = len(flat)
    energy_uj = entry["energy_uj"] if entry["energy_complete"] else None
    return {
        "batch": entry["batch"], "seq": entry["seq"],
        "stats": latency_stats(flat, entry["batch"], entry["seq"]),
        "round_medians_ms": [float(np.median(r)) * 1e3 for r in entry["rounds"]],
        "round_median_spread": round_medians_spread(entry["rounds"]),
        "calls": calls, "calls_per_round": entry["calls_per_round"],
        "checksum": entry["checksum"],
        "cpu_s_per_inference": entry["cpu_s"] / calls,
        "energy_j_per_inference": energy_per_inference(energy_method, entry["cpu_s"], energy_uj, calls),
    }


def _decode_entry(entry: dict) -> dict[str, Any]:
    from edgeprune.bench.metrics import latency_stats

    steps = [t for r in entry["rounds"] for t in r]
    step = latency_stats(steps, entry["batch"], 1)
    return {
        "batch": entry["batch"], "seq": entry["seq"], "new_tokens": entry["new_tokens"],
        "prefill": latency_stats(entry["prefill"], entry["batch"], entry["seq"]),
        "step": step,
        # tokens generated per second across the batch, from the median step (robust to stray slow steps)
        "decode_tokens_s": entry["batch"] / (step["p50_ms"] / 1e3),
        "checksum": entry["checksum"],
    }


def assemble(models: list[BenchModel], config: BenchConfig, raw_by_runtime: dict[str, dict], order: list[dict],
             quality: dict[str, Any], quality_runtime: str | None, env: dict, out_dir: Path) -> dict[str, Any]:
    from edgeprune.bench.energy import EnergyMeter, describe_method
    from edgeprune.core.artifacts import onnx_model_path
    from edgeprune.bench.metrics import analytic_flops, model_size

    energy_method = describe_method(EnergyMeter.open(), config.watts_per_core)
    agreement = agreement_vs_dense(quality, models[0].label, config.task) if quality else {}
    entries = []
    for model in models:
        runs = []
        for runtime, raw in raw_by_runtime.items():
            data = raw.get(model.label, {})
            if "skipped" in data or not data:
                runs.append({"runtime": runtime, "skipped": data.get("skipped", "not measured")})
                continue
            onnx_path = onnx_model_path(model.path, runtime)
            runs.append({
                "runtime": runtime,
                "file": str(onnx_path),
                "size": model_size(model.path if model.path.is_dir() else model.path.parent, onnx_path),
                "load_s": data["load"]["load_s"],
                **({"build": data["load"]["build"]} if data["load"].get("build") else {}),
                "inputs": data["load"]["inputs"],
                "memory": data["memory"],
                "latency": [_latency_entry(e, energy_method) for e in data["forward"].values()],
                "decode": [_decode_entry(e) for e in data["decode"].values()],
            })
        model_dir = model.path if model.path.is_dir() else model.path.parent
        first = next((r for r in runs if not r.get("skipped")), None)
        q = dict(quality.get(model.label) or {}) if quality else None
        if q is not None:
            q.pop("agreement_path", None)
            q["runtime"] = quality_runtime
        path = model.path
        try:
            shown = str(path.relative_to(out_dir)) if model.exported_here else str(path)
        except ValueError:
            shown = str(path)
        entries.append({
            "label": model.label, "role": model.role, "source": model.source, "path": shown,
            "exported_by_bench": model.exported_here,
            "size": first["size"] if first else None,
            "flops": analytic_flops(model_dir, config.seqs),
            "runs": runs, "quality": q or None, "agreement": agreement.get(model.label),
        })
    report = {
        "schema": "edgeprune.bench.report/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env, "config": config.to_dict(), "energy_method": energy_method,
        "models": entries, "order": order, "comparisons": comparisons(entries, config),
    }
    return report


def paired_round_speedups(dense_rounds: list[float] | None, model_rounds: list[float] | None) -> dict | None:
    """Speedup within each round (dense round median / model round median), summarised.

    A round visits every model within seconds, so the pair shares the machine's state; on hosts whose
    speed shifts over tens of seconds (e.g. a busy SMT sibling) the spread shows it, and the median of
    the paired ratios is less exposed to it than the ratio of the pooled medians."""
    if not dense_rounds or not model_rounds or len(dense_rounds) != len(model_rounds):
        return None
    ratios = np.asarray(dense_rounds, dtype=np.float64) / np.asarray(model_rounds, dtype=np.float64)
    return {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max()),
            "rounds": len(ratios)}


def comparisons(entries: list[dict], config: BenchConfig) -> list[dict]:
    from edgeprune.bench.metrics import quality_ratio, ratio

    dense = entries[0]
    out = []
    for runtime in config.runtimes:
        dense_run = next((r for r in dense["runs"] if r["runtime"] == runtime and not r.get("skipped")), None)
        if dense_run is None:
            continue
        for entry in entries:
            run = next((r for r in entry["runs"] if r["runtime"] == runtime and not r.get("skipped")), None)
            if run is None:
                continue
            for lat in run["latency"]:
                b, s = lat["batch"], lat["seq"]
                dl = next(x for x in dense_run["latency"] if x["batch"] == b and x["seq"] == s)
                dec = next((d for d in run["decode"] if d["batch"] == b and d["seq"] == s), None)
                ddec = next((d for d in dense_run["decode"] if d["batch"] == b and d["seq"] == s), None)
                flops = (entry["flops"] or {}).get("per_sequence", {}).get(str(s))
                dflops = (dense["flops"] or {}).get("per_sequence", {}).get(str(s))
                q, dq = entry.get("quality") or {}, dense.get("quality") or {}
                out.append({
                    "runtime": runtime, "batch": b, "seq": s, "model": entry["label"],
                    "p50_ms": lat["stats"]["p50_ms"],
                    "speedup_p50": ratio(dl["stats"]["p50_ms"], lat["stats"]["p50_ms"]),
                    "speedup_mean": ratio(dl["stats"]["mean_ms"], lat["stats"]["mean_ms"]),
                    # fastest call vs fastest call: the least load-sensitive figure on a shared machine
                    "speedup_min": ratio(dl["stats"]["min_ms"], lat["stats"]["min_ms"]),
                    "speedup_rounds": paired_round_speedups(dl.get("round_medians_ms"), lat.get("round_medians_ms")),
                    "flops_ratio": ratio(dflops, flops),
                    "size_ratio": ratio((run["size"] or {}).get("bytes"), (dense_run["size"] or {}).get("bytes")),
                    "gzip_size_ratio": ratio((run["size"] or {}).get("gzip_bytes"),
                                             (dense_run["size"] or {}).get("gzip_bytes")),
                    "memory_ratio": ratio(run["memory"]["peak_rss_bytes"], dense_run["memory"]["peak_rss_bytes"]),
                    "quality": q.get("value"),
                    "quality_ratio": quality_ratio(q.get("metric", ""), q.get("value"), dq.get("value")),
                    "decode_speedup": ratio(dec["decode_tokens_s"], ddec["decode_tokens_s"]) if dec and ddec else None,
                    "prefill_speedup": ratio(ddec["prefill"]["p50_ms"], dec["prefill"]["p50_ms"]) if dec and ddec else None,
                })
    return out


def bench(dense: str, candidates: list[str], out: str | os.PathLike, config: BenchConfig | None = None,
          overwrite: bool = False, labels: list[str] | None = None, export_task: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark ``dense`` and ``candidates`` (export dirs, or sources exported here in fp32) into ``out``."""
    from edgeprune.core.artifacts import check_output_dir, staged_output, write_manifest
    from edgeprune.bench import report as report_mod
    from edgeprune.core.data_sources import resolve_data
    from edgeprune.runtime.base import get_runtime

    from edgeprune.bench.harness import check_labels, check_sources
    from edgeprune.eval.api import LM_TASKS, ZERO_SHOT, resolve_task_data

    config = config or BenchConfig()
    check_output_dir(out, overwrite)
    for name in config.runtimes:
        get_runtime(name)  # fail early with the runtime's own install hint
    if config.task in ZERO_SHOT:  # malformed task files fail before any timing
        from edgeprune.eval.zeroshot import read_items

        config = config.replace(data=str(resolve_task_data(config.task, config.data)))
        read_items(config.task, config.data, limit=config.eval_limit)
    elif config.data:
        config = config.replace(data=str(resolve_data(config.data)))  # a file or a built-in key (stsb:dev)
    check_labels(labels, candidates)
    check_sources([dense] + list(candidates), config)
    if export_task is None and config.task in LM_TASKS:
        export_task = "text-generation"
    with staged_output(out, overwrite) as tmp:
        env = environment(config)
        # on-the-fly exports also get the file DeepSparse loads when it is among the runtimes
        target = "deepsparse" if "deepsparse" in config.runtimes else None
        models = prepare_models(dense, candidates, tmp, export_task, labels, log, target)
        raw_by_runtime, order = {}, []
        for runtime in config.runtimes:
            raw, executed = measure_runtime(models, runtime, config, log)
            raw_by_runtime[runtime] = raw
            order.extend(executed)
        measured = [m.label for m in models[1:]
                    if any(raw.get(m.label) and "skipped" not in raw[m.label] for raw in raw_by_runtime.values())]
        if candidates and not measured:
            first = next(iter(raw_by_runtime.values()))
            reasons = "; ".join(f"{m.label}: {(first.get(m.label) or {}).get('skipped', 'not measured')}"
                                for m in models[1:])
            raise EdgePruneError(f"no candidate could be measured ({reasons}); nothing to compare with the dense model")
        quality, quality_runtime = {}, None
        if config.task:
            quality_runtime = config.runtimes[0]
            quality = measure_quality(models, quality_runtime, config, tmp / "work", log)
        env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        # exported models live inside the report dir: their paths are recorded relative to it
        report = assemble(models, config, raw_by_runtime, order, quality, quality_runtime, env, tmp)
        report_mod.write(report, tmp, log)
        import shutil

        shutil.rmtree(tmp / "work", ignore_errors=True)
        write_manifest(tmp, "bench", config.to_dict(), parent=None,
                       models=[{"label": m.label, "source": m.source} for m in models])
    return report
