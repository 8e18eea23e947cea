"""report.json (schema-checked), report.md (tables with ratios vs dense) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_ID = "edgeprune.bench.report/1"

# A JSON-Schema subset (type / required / properties / items / enum), checked by ``validate`` without a
# jsonschema dependency.
_NUM = {"type": ["number", "null"]}
_STATS = {"type": "object", "required": ["n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_seq_s",
                                         "throughput_tok_s"],
          "properties": {k: {"type": "number"} for k in ("n", "p50_ms", "p90_ms", "p99_ms", "mean_ms")}}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "created", "environment", "config", "energy_method", "models", "order", "comparisons"],
    "properties": {
        "schema": {"enum": [SCHEMA_ID]},
        "created": {"type": "string"},
        "environment": {"type": "object", "required": ["cpu_model", "cpu_flags", "logical_cpus", "threads",
                                                       "libraries", "platform"]},
        "config": {"type": "object", "required": ["runtimes", "batches", "seqs", "rounds", "warmup"]},
        "energy_method": {"type": "object", "required": ["method"],
                          "properties": {"method": {"enum": ["measured", "estimate"]}}},
        "models": {"type": "array", "items": {
            "type": "object",
            "required": ["label", "role", "source", "path", "size", "flops", "runs", "quality", "agreement"],
            "properties": {
                "role": {"enum": ["dense", "candidate"]},
                "size": {"type": ["object", "null"]},
                "runs": {"type": "array", "items": {
                    "type": "object", "required": ["runtime"],
                    "properties": {
                        "latency": {"type": "array", "items": {
                            "type": "object",
                            "required": ["batch", "seq", "stats", "round_median_spread", "checksum", "calls",
                                         "energy_j_per_inference", "cpu_s_per_inference"],
                            "properties": {"stats": _STATS, "energy_j_per_inference": _NUM}}},
                        "decode": {"type": "array", "items": {
                            "type": "object",
                            "required": ["batch", "seq", "new_tokens", "prefill", "step", "decode_tokens_s"],
                            "properties": {"decode_tokens_s": {"type": "number"}}}},
                        "memory": {"type": "object", "required": ["peak_rss_bytes"]},
                    }}},
            }}},
        "order": {"type": "array", "items": {
            "type": "object", "required": ["runtime", "batch", "seq", "round", "model", "kind", "calls"]}},
        "comparisons": {"type": "array", "items": {
            "type": "object", "required": ["runtime", "batch", "seq", "model", "speedup_p50", "flops_ratio",
                                           "size_ratio", "quality_ratio"]}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int,
          "boolean": bool, "null": type(None)}


def validate(data: Any, schema: dict | None = None, where: str = "report") -> list[str]:
    """Problems found (empty list: valid)."""
    schema = SCHEMA if schema is None else schema
    problems: list[str] = []
    if "enum" in schema and data not in schema["enum"]:
        problems.append(f"{where}: {data!r} not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(data, _TYPES[t]) and not (t in ("number", "integer") and isinstance(data, bool))
                 for t in types)
        if not ok:
            return problems + [f"{where}: expected {'/'.join(types)}, got {type(data).__name__}"]
    if isinstance(data, dict):
        for key in schema.get("required", []):
            if key not in data:
                problems.append(f"{where}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in data:
                problems.extend(validate(data[key], sub, f"{where}.{key}"))
    if isinstance(data, list) and "items" in schema:
        for i, item in enumerate(data):
            problems.extend(validate(item, schema["items"], f"{where}[{i}]"))
    return problems


def check(report: dict) -> None:
    problems = validate(report)
    if problems:
        raise ValueError("report.json does not match its schema: " + "; ".join(problems[:5]))


# --- markdown -------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{spec}}{suffix}"


def _round_speedups(rounds: dict | None) -> str:
    if not rounds:
        return "–"
    return f"{rounds['median']:.2f}× ({rounds['min']:.2f}–{rounds['max']:.2f})"


def _ms(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _mb(value) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    energy = report["energy_method"]
    lines = [
        "# edgeprune benchmark",
        "",
        f"{report['created']} · {'timed on ' + env['host'] + ' · ' if env.get('host') else ''}"
        f"{env['cpu_model']} · {env['logical_cpus']} logical CPUs · threads "
        f"{env['threads'] or 'runtime default'} · flags {' '.join(env['cpu_flags']) or 'n/a'}",
        f"Interleaved: {cfg['rounds']} rounds per shape, models rotated each round, {cfg['warmup']} warm-up calls; "
        f"energy: **{energy['method']}** ({energy.get('model') or energy.get('source')}).",
        "",
    ]
    by_label = {m["label"]: m for m in report["models"]}
    quality_metric = next((m["quality"]["metric"] for m in report["models"] if m.get("quality")
                           and "metric" in m["quality"]), None)
    header = ("| model | p50 ms | p90 ms | p99 ms | speedup | per-round speedup (range) | FLOPs ratio | seq/s | file MB | gzip MB | params M | "
              "peak RSS MB | energy mJ/inf | " + (f"{quality_metric} | quality vs dense |" if quality_metric else ""))
    for runtime in cfg["runtimes"]:
        for batch in cfg["batches"]:
            for seq in cfg["seqs"]:
                rows = [c for c in report["comparisons"] if c["runtime"] == runtime and c["batch"] == batch
                        and c["seq"] == seq]
                if not rows:
                    continue
                lines += [f"## {runtime}, batch {batch}, seq {seq}", "", header, "|" + "---|" * (header.count("|") - 1)]
                for c in rows:
                    model = by_label[c["model"]]
                    run = next(r for r in model["runs"] if r["runtime"] == runtime)
                    lat = next(x for x in run["latency"] if x["batch"] == batch and x["seq"] == seq)
                    stats, size, q = lat["stats"], run.get("size") or {}, model.get("quality") or {}
                    energy_mj = None if lat["energy_j_per_inference"] is None else lat["energy_j_per_inference"] * 1e3
                    cells = [model["label"], _ms(stats["p50_ms"]), _ms(stats["p90_ms"]), _ms(stats["p99_ms"]),
                             _fmt(c["speedup_p50"], ".2f", "×"), _round_speedups(c.get("speedup_rounds")),
                             _fmt(c["flops_ratio"], ".2f"),
                             _fmt(stats["throughput_seq_s"], ".1f"), _mb(size.get("bytes")), _mb(size.get("gzip_bytes")),
                             _fmt(None if size.get("parameters") is None else size["parameters"] / 1e6, ".1f"),
                             _mb(run["memory"]["peak_rss_bytes"]), _fmt(energy_mj, ".1f")]
                    if quality_metric:
                        cells += [_fmt(q.get("value"), ".2f"), _fmt(c["quality_ratio"], ".1%")]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
    decode_rows = [(m, r, d) for m in report["models"] for r in m["runs"] for d in r.get("decode", [])]
    if decode_rows:
        lines += ["## decoder: prefill and KV-cache decode", "",
                  "| model | runtime | batch | prompt | prefill p50 ms | decode tokens/s | decode speedup |",
                  "|---|---|---|---|---|---|---|"]
        for m, r, d in decode_rows:
            comp = next((c for c in report["comparisons"] if c["model"] == m["label"] and c["runtime"] == r["runtime"]
                         and c["batch"] == d["batch"] and c["seq"] == d["seq"]), {})
            lines.append(f"| {m['label']} | {r['runtime']} | {d['batch']} | {d['seq']} | {_ms(d['prefill']['p50_ms'])} | "
                         f"{_fmt(d['decode_tokens_s'], '.1f')} | {_fmt(comp.get('decode_speedup'), '.2f', '×')} |")
        lines.append("")
    agreements = [(m["label"], m["agreement"]) for m in report["models"] if m.get("agreement")]
    if agreements:
        lines += ["## output agreement with dense", "", "| model | cosine mean | cosine min | top-1 agreement |",
                  "|---|---|---|---|"]
        for label, a in agreements:
            lines.append(f"| {label} | {a['cosine_mean']:.4f} | {a['cosine_min']:.4f} | {_fmt(a['top1_agreement'], '.3f')} |")
        lines.append("")
    skipped = [(m["label"], r["runtime"], r["skipped"]) for m in report["models"] for r in m["runs"] if r.get("skipped")]
    for label, runtime, why in skipped:
        lines.append(f"- {label} not run on {runtime}: {why}")
    for m in report["models"]:
        if (m.get("quality") or {}).get("error"):
            lines.append(f"- {m['label']}: no quality figure ({m['quality']['error']})")
    lines += ["", "Speedup = dense p50 / model p50 at the same runtime, threads and inputs. Per-round speedup: "
              "median (min-max) over rounds of dense round median / model round median. FLOPs ratio = dense "
              "block FLOPs / model block FLOPs (analytic). Energy is per inference by the method stated above.",
              "Timings from a shared machine are noisy: compare the round-median spread in report.json."]
    if env.get("load_average_start"):
        lines.append(f"Load average at start {env['load_average_start'][0]:.2f}, at end "
                     f"{(env.get('load_average_end') or [float('nan')])[0]:.2f}.")
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------------------

def plot(report: dict, out_dir: Path) -> list[str]:
    """latency vs quality and size vs quality at the first runtime/batch and the longest sequence."""
    models = [m for m in report["models"] if (m.get("quality") or {}).get("value") is not None]
    if len(models) < 1 or not report["comparisons"]:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    runtime, batch, seq = cfg["runtimes"][0], cfg["batches"][0], cfg["seqs"][-1]
    metric = models[0]["quality"]["metric"]
    points = []
    for m in models:
        run = next((r for r in m["runs"] if r["runtime"] == runtime and not r.get("skipped")), None)
        if run is None:
            continue
        lat = next((x for x in run["latency"] if x["batch"] == batch and x["seq"] == seq), None)
        if lat is None:
            continue
        points.append((m["label"], lat["stats"]["p50_ms"], (run.get("size") or {}).get("bytes"), m["quality"]["value"]))
    written = []
    for name, index, xlabel in (("latency_vs_quality.png", 1, f"p50 latency (ms), {runtime}, batch {batch}, seq {seq}"),
                                ("size_vs_quality.png", 2, "ONNX file size (MB)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for p in points:
            if p[index] is None:
                continue
            x = p[index] / 1e6 if index == 2 else p[index]
            ax.scatter(x, p[3], s=30)
            ax.annotate(p[0], (x, p[3]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def write(report: dict, out_dir: Path, log=print) -> None:
    """report.json and report.md first (the measurements never depend on plotting), then the PNG plots,
    which need matplotlib: a runtime-only install skips them with one note."""
    import importlib.util

    check(report)
    out_dir = Path(out_dir)
    report["plots"] = []
    (out_dir / "report.md").write_text(markdown(report))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    try:
        plotting = importlib.util.find_spec("matplotlib") is not None
    except ImportError:  # a broken or blocked installation counts as absent
        plotting = False
    if not plotting:
        if any((m.get("quality") or {}).get("value") is not None for m in report["models"]):
            log("plots skipped: matplotlib is not installed (pip install matplotlib, or 'edgeprune[full]')")
        return
    report["plots"] = plot(report, out_dir)
    if report["plots"]:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
