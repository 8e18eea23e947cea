"""``edgeprune report merge``: the report.json files of several devices side by side.

Each bench report carries its host description (``environment``); merging puts one column group per device
into one Markdown table and one plot. Reports only merge when they measured the same models (by label and
file size) under the same settings: otherwise the columns would compare different things.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeprune.core.errors import EdgePruneError

MERGED_SCHEMA_ID = "edgeprune.bench.fleet/1"
# Settings that change what a latency or quality number means; the rest (rounds, warm-up) only its noise.
COMPARED_SETTINGS = ("batches", "seqs", "threads", "task", "new_tokens", "eval_limit", "eval_max_tokens",
                     "eval_max_length")


def read_report(path: str | Path) -> dict[str, Any]:
    from edgeprune.bench.report import check

    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise EdgePruneError(f"report not found: {path} (give a report.json or the folder holding it)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgePruneError(f"{path}: not a readable report.json ({exc.__class__.__name__})") from None
    try:
        check(report)
    except ValueError as exc:
        raise EdgePruneError(f"{path}: {exc}") from None
    report["_path"] = str(path)
    return report


def _model_identity(report: dict) -> dict[str, Any]:
    return {m["label"]: (m.get("size") or {}).get("bytes") for m in report["models"]}


def _settings(report: dict) -> dict[str, Any]:
    return {key: report["config"].get(key) for key in COMPARED_SETTINGS}


def check_compatible(reports: list[dict]) -> None:
    """Refuse, in one line naming the difference, reports that did not measure the same thing."""
    first = reports[0]
    for other in reports[1:]:
        where = f"{other['_path']} vs {first['_path']}"
        mine, theirs = _model_identity(first), _model_identity(other)
        if set(mine) != set(theirs):
            raise EdgePruneError(f"reports measured different models ({where}): "
                                 f"{sorted(mine)} vs {sorted(theirs)}")
        changed = [label for label in mine if mine[label] != theirs[label]]
        if changed:
            raise EdgePruneError(f"reports measured different files for {', '.join(changed)} ({where}): "
                                 f"sizes {[mine[c] for c in changed]} vs {[theirs[c] for c in changed]} bytes")
        settings, other_settings = _settings(first), _settings(other)
        diff = [f"{k} {settings[k]!r} vs {other_settings[k]!r}" for k in COMPARED_SETTINGS
                if settings[k] != other_settings[k]]
        if diff:
            raise EdgePruneError(f"reports used different settings ({where}): {'; '.join(diff)}")


def device_name(report: dict) -> str:
    env = report["environment"]
    return f"{env.get('cpu_model') or 'unknown CPU'}, {env.get('threads')} threads"


def device_names(reports: list[dict], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(reports):
            raise EdgePruneError(f"--names gives {len(names)} names for {len(reports)} reports")
        return list(names)
    base = [device_name(r) for r in reports]
    # Two hosts with the same CPU still need distinct columns.
    return [f"{b} #{i + 1}" if base.count(b) > 1 else b for i, b in enumerate(base)]


def merge(reports: list[dict], names: list[str] | None = None) -> dict[str, Any]:
    if len(reports) < 2:
        raise EdgePruneError("report merge needs at least two reports")
    check_compatible(reports)
    devices = device_names(reports, names)
    rows: dict[tuple, dict[str, Any]] = {}
    for device, report in zip(devices, reports):
        for comp in report["comparisons"]:
            key = (comp["runtime"], comp["model"], comp["batch"], comp["seq"])
            row = rows.setdefault(key, {"runtime": key[0], "model": key[1], "batch": key[2], "seq": key[3],
                                        "devices": {}})
            row["devices"][device] = {
                "p50_ms": comp.get("p50_ms"),
                "speedup": (comp.get("speedup_rounds") or {}).get("median", comp.get("speedup_p50")),
                "decode_speedup": comp.get("decode_speedup"),
                "quality": comp.get("quality"),
                "quality_ratio": comp.get("quality_ratio"),
            }
    return {
        "schema": MERGED_SCHEMA_ID,
        "devices": [{"name": d, "report": r["_path"], "created": r["created"], "environment": r["environment"]}
                    for d, r in zip(devices, reports)],
        "settings": _settings(reports[0]),
        "rows": list(rows.values()),
    }


def _cell(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(merged: dict) -> str:
    devices = [d["name"] for d in merged["devices"]]
    head = ["runtime", "model", "batch", "seq"]
    for d in devices:
        head += [f"{d}: p50 ms", f"{d}: speedup", f"{d}: quality"]
    lines = ["# Fleet report", "",
             "One column group per device; speedups are the median of per-round paired ratios against the dense "
             "model timed on the same device in the same run.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in merged["rows"]:
        cells = [row["runtime"], row["model"], str(row["batch"]), str(row["seq"])]
        for d in devices:
            got = row["devices"].get(d)
            if got is None:
                cells += ["–", "–", "–"]
                continue
            cells += [_cell(got["p50_ms"], ".2f"), _cell(got["speedup"], ".2f", "×"), _cell(got["quality"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Devices:", ""]
    for d in merged["devices"]:
        env = d["environment"]
        libs = env.get("libraries") or {}
        lines.append(f"- **{d['name']}**: {env.get('logical_cpus')} logical CPUs, {env.get('platform')}, "
                     f"onnxruntime {libs.get('onnxruntime', '?')}, measured {d['created']} ({d['report']})")
    return "\n".join(lines) + "\n"


def plot(merged: dict, out_dir: Path) -> list[str]:
    """Speedup per model, one bar per device, for each runtime/batch/seq measured."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [d["name"] for d in merged["devices"]]
    rows = [r for r in merged["rows"] if any(v.get("speedup") for v in r["devices"].values())]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) * len(devices)), 4), dpi=110)
    width = 0.8 / len(devices)
    for i, device in enumerate(devices):
        values = [(r["devices"].get(device) or {}).get("speedup") or 0.0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=device)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']}\n{r['runtime']} b{r['batch']} s{r['seq']}" for r in rows], fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speedup vs dense (median per-round ratio)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "fleet_speedup.png")
    plt.close(fig)
    return ["fleet_speedup.png"]


def write_merged(report_paths: list[str], out: str | Path, names: list[str] | None = None,
                 overwrite: bool = False) -> Path:
    from edgeprune.core.artifacts import check_output_dir, staged_output

    check_output_dir(out, overwrite)
    merged = merge([read_report(p) for p in report_paths], names)
    with staged_output(out, overwrite) as tmp:
        merged["plots"] = plot(merged, tmp)
        (tmp / "fleet.json").write_text(json.dumps(merged, indent=1, default=float) + "\n")
        (tmp / "fleet.md").write_text(markdown(merged))
    return Path(out)


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="combine benchmark reports (report merge R1 R2 ... -o OUT)")
    p.add_argument("action", choices=["merge"])
    p.add_argument("reports", nargs="+", help="report.json files (or their folders) from several devices")
    p.add_argument("-o", "--output", required=True, help="output folder (fleet.md, fleet.json, fleet_speedup.png)")
    p.add_argument("--names", help="comma-separated device names, one per report (default: CPU model)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = write_merged(args.reports, args.output, names, args.overwrite)
    print((out / "fleet.md").read_text(), end="")
    return 0
