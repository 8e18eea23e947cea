"""The decoder edge suite: dense and pruned SmolLM2-135M GGUFs on llama.cpp (size, prefill, decode, peak RSS,
energy estimate in one interleaved ``edgeprune bench`` run), their quality (WikiText-2 perplexity, LAMBADA,
HellaSwag, PIQA) through llama.cpp on the same files, the cost model's predicted speedups beside the
measured ones, and one report with the decode tokens/s vs LAMBADA accuracy plot (Pareto frontier and the
dense q4_0 point marked).

    python benchmarks/tools/decoder_edge_suite.py time SUITE.yaml OUT [--lock FILE]   # timing (quiet machine)
    python benchmarks/tools/decoder_edge_suite.py quality SUITE.yaml OUT               # quality, per variant
    python benchmarks/tools/decoder_edge_suite.py report SUITE.yaml OUT                # OUT/report.md, plot

SUITE.yaml (benchmarks/smollm2-edge.yaml): ``dense`` (the label of the reference, dense q4_0), ``variants``
(label, gguf, method: dense / width / depth / both, stage: source / post-training / distilled), ``bench``
(threads, seq, new_tokens, rounds), ``quality`` (ppl_tokens, limit). Paths are relative to the YAML file's
folder unless absolute; ``$VAR`` is expanded. ``quality`` runs each variant separately and keeps finished
ones (OUT/quality/<label>.json), so it can be resumed; ``report`` uses whatever has been measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

TASKS = ("perplexity", "lambada", "hellaswag", "piqa")


def load_suite(path: Path) -> dict:
    suite = yaml.safe_load(path.read_text())
    base = path.resolve().parent
    for v in suite["variants"]:
        p = Path(os.path.expandvars(os.path.expanduser(v["gguf"])))
        v["gguf"] = str(p if p.is_absolute() else base / p)
    labels = [v["label"] for v in suite["variants"]]
    if suite["dense"] not in labels:
        sys.exit(f"edgeprune: error: {path}: dense {suite['dense']!r} is not among the variants ({', '.join(labels)})")
    return suite


@contextlib.contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cmd_time(suite: dict, out: Path, args) -> None:
    from edgeprune.bench.api import bench
    from edgeprune.bench.harness import BenchConfig

    b = suite.get("bench", {})
    present = [v for v in suite["variants"] if Path(v["gguf"]).is_file()]
    missing = [v["label"] for v in suite["variants"] if not Path(v["gguf"]).is_file()]
    if missing:
        print(f"not timed (no file yet): {', '.join(missing)}", file=sys.stderr)
    dense = next(v for v in present if v["label"] == suite["dense"])
    others = [v for v in present if v is not dense]
    config = BenchConfig(runtimes=("llamacpp",), batches=(1,), seqs=(int(b.get("seq", 128)),),
                         threads=int(b.get("threads", 2)), rounds=int(b.get("rounds", 6)), warmup=2,
                         round_seconds=float(b.get("round_seconds", 0.25)), new_tokens=int(b.get("new_tokens", 32)))
    with locked(args.lock):
        machine = {"cpu": cpu_name(), "load_average_start": list(os.getloadavg()),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        bench(dense["gguf"], [v["gguf"] for v in others], out / "bench", config, overwrite=True,
              labels=[dense["label"]] + [v["label"] for v in others])
        machine["load_average_end"] = list(os.getloadavg())
    (out / "machine.json").write_text(json.dumps(machine, indent=1))


def cmd_quality(suite: dict, out: Path, args) -> None:
    from edgeprune.eval.api import EvalConfig, evaluate

    q = suite.get("quality", {})
    (out / "quality").mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    for v in suite["variants"]:
        target = out / "quality" / f"{v['label']}.json"
        if (only and v["label"] not in only) or not Path(v["gguf"]).is_file():
            continue
        scores = json.loads(target.read_text()) if target.is_file() else {}
        tasks = args.tasks.split(",") if args.tasks else q.get("tasks", TASKS)
        for task in [t for t in tasks if t not in scores]:
            config = (EvalConfig(task=task, max_tokens=int(q.get("ppl_tokens", 8192))) if task == "perplexity"
                      else EvalConfig(task=task, limit=q.get("limit"), batch_size=16))
            data = q.get("data", {}).get(task)
            r = evaluate(v["gguf"], data, config, runtime="llamacpp", threads=int(suite.get("bench", {}).get("threads", 2)))
            scores[task] = {k: r[k] for k in ("metric", "value", "acc", "acc_norm", "n", "seconds", "data") if k in r}
            scores[task]["load_average"] = list(os.getloadavg())
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(scores, indent=1))
            os.replace(tmp, target)
            print(v["label"], task, scores[task]["value"], flush=True)


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (higher is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)]


def rows(suite: dict, out: Path) -> list[dict]:
    report = json.loads((out / "bench" / "report.json").read_text()) if (out / "bench" / "report.json").is_file() else None
    cost = None
    if suite.get("cost_model"):
        from edgeprune.compress.cost_model import CostModel

        p = Path(os.path.expandvars(suite["cost_model"]))
        cost = CostModel.from_dict(json.loads(p.read_text())) if p.is_file() else None
    by_label = {m["label"]: m for m in report["models"]} if report else {}
    comparisons = {c["model"]: c for c in report["comparisons"]} if report else {}
    from edgeprune.compress.cost_model import gguf_file_type, gguf_layers

    dense_gguf = next(v["gguf"] for v in suite["variants"] if v["label"] == suite["dense"])
    dense_type = gguf_file_type(Path(dense_gguf)) if Path(dense_gguf).is_file() else None
    dense_layers = gguf_layers(Path(dense_gguf)) if cost is not None else None
    table = []
    for v in suite["variants"]:
        row = dict(v)
        q = out / "quality" / f"{v['label']}.json"
        row["quality"] = json.loads(q.read_text()) if q.is_file() else {}
        row["file_type"] = gguf_file_type(Path(v["gguf"])) if Path(v["gguf"]).is_file() else None
        row["same_type_as_dense"] = row["file_type"] == dense_type
        m = by_label.get(v["label"])
        if m:
            run = m["runs"][0]
            lat = (run.get("latency") or [{}])[0]
            dec = (run.get("decode") or [{}])[0]
            row.update(bytes=run["size"]["bytes"], peak_rss=run.get("memory", {}).get("peak_rss_bytes"),
                       prefill_tok_s=dec.get("prefill", {}).get("throughput_tok_s"),
                       decode_tok_s=dec.get("decode_tokens_s"),
                       energy_mj=(lat.get("energy_j_per_inference") or 0) * 1e3 or None,
                       prefill_speedup=comparisons.get(v["label"], {}).get("prefill_speedup"),
                       decode_speedup=comparisons.get(v["label"], {}).get("decode_speedup"),
                       decode_rounds=comparisons.get(v["label"], {}).get("decode_speedup_rounds"))
        elif Path(v["gguf"]).is_file():
            row["bytes"] = Path(v["gguf"]).stat().st_size
        if cost is not None and Path(v["gguf"]).is_file() and row["same_type_as_dense"]:
            # the cost model was measured on the dense file's quantization: other types are not predicted
            try:
                row["predicted"] = cost.speedup(gguf_layers(Path(v["gguf"])), dense_layers)
            except (KeyError, ValueError):
                pass
        table.append(row)
    return table


def cmd_report(suite: dict, out: Path, args) -> None:
    table = rows(suite, out)
    dense = next(r for r in table if r["label"] == suite["dense"])
    source = next((r for r in table if r.get("stage") == "source"), None)
    ref_q = (source or dense)["quality"]
    head = ("| variant | method | stage | file MB | prefill tok/s | decode tok/s | prefill / decode vs dense q4_0 "
            "| predicted (cost model) | peak RSS MB | energy mJ/call (est.) | WikiText-2 ppl | LAMBADA acc | HellaSwag acc_norm | PIQA acc |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "–"

    for r in table:
        q = r["quality"]
        pred = r.get("predicted")
        lines.append(" | ".join([
            f"| {r['label']}", r.get("method", ""), r.get("stage", ""), fmt((r.get("bytes") or 0) / 1e6 or None, ".1f"),
            fmt(r.get("prefill_tok_s"), ".0f"), fmt(r.get("decode_tok_s"), ".1f"),
            f"{fmt(r.get('prefill_speedup'), '.2f')}x / {fmt(r.get('decode_speedup'), '.2f')}x",
            f"{pred['prefill']:.2f}x / {pred['decode']:.2f}x" if pred else "–",
            fmt((r.get("peak_rss") or 0) / 1e6 or None, ".0f"), fmt(r.get("energy_mj"), ".0f"),
            fmt(q.get("perplexity", {}).get("value"), ".2f"), fmt(q.get("lambada", {}).get("acc", q.get("lambada", {}).get("value")), ".4f"),
            fmt(q.get("hellaswag", {}).get("acc_norm"), ".4f"), fmt(q.get("piqa", {}).get("acc"), ".4f")]) + " |")
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {}
    text = ["# Decoder edge suite (SmolLM2-135M, llama.cpp)", "",
            f"CPU: {machine.get('cpu', cpu_name())}; load average at start / end of the timing run: "
            f"{machine.get('load_average_start')} / {machine.get('load_average_end')}; {machine.get('date', '')}.",
            f"Timing: one interleaved `edgeprune bench` run (llama.cpp, {suite.get('bench', {}).get('threads', 2)} "
            f"threads, batch 1, prompt {suite.get('bench', {}).get('seq', 128)}, "
            f"{suite.get('bench', {}).get('new_tokens', 32)} greedy KV-cache steps per round). Quality through "
            f"llama.cpp on the same files: WikiText-2 valid perplexity on the first "
            f"{suite.get('quality', {}).get('ppl_tokens', 8192)} tokens (window 512, stride 256), zero-shot on "
            f"the first {suite.get('quality', {}).get('limit')} dev items of each task.", ""] + lines
    text += ["", "Reference for quality retention: " + (source or dense)["label"] + " (the source model, evaluated "
             "the same way). Predicted = the host's cost model (`edgeprune cost`), for files of the dense "
             "reference's quantization only. Energy: the bench's estimate (process CPU time x 4 W per busy core) "
             "per timed call (one 128-token forward returning every position's logits)."]
    targets = headline(table, dense, ref_q, suite)
    if targets:
        text += ["", "## Headline targets", ""] + targets
    plot_path = plot(table, suite, out)
    if plot_path:
        text += ["", f"![decode vs LAMBADA]({plot_path.name})"]
    (out / "report.md").write_text("\n".join(text) + "\n")
    (out / "table.json").write_text(json.dumps(table, indent=1, default=str))
    print("\n".join(text))


def headline(table: list[dict], dense: dict, ref_q: dict, suite: dict) -> list[str]:
    out = []
    ppl_ref = ref_q.get("perplexity", {}).get("value")
    lam_ref = ref_q.get("lambada", {}).get("value")
    for r in table:
        if r.get("method") in (None, "dense") or r.get("decode_speedup") is None or not r.get("same_type_as_dense"):
            continue  # the targets are for a pruned file of the dense reference's type (q4_0)
        q = r["quality"]
        checks = [("q4_0 file <= 75 MB", (r.get("bytes") or 1e12) <= 75e6, f"{(r.get('bytes') or 0) / 1e6:.1f} MB"),
                  ("decode >= 1.3x dense q4_0", r["decode_speedup"] >= 1.3, f"{r['decode_speedup']:.2f}x"),
                  ("prefill >= 1.25x dense q4_0", (r.get("prefill_speedup") or 0) >= 1.25,
                   f"{fmt_or(r.get('prefill_speedup'))}x")]
        if ppl_ref and "perplexity" in q:
            checks.append(("ppl <= dense + 15 %", q["perplexity"]["value"] <= ppl_ref * 1.15,
                           f"{q['perplexity']['value']:.2f} vs {ppl_ref:.2f} ({q['perplexity']['value'] / ppl_ref - 1:+.1%})"))
        if lam_ref and "lambada" in q:
            checks.append(("LAMBADA >= 90 % of dense", q["lambada"]["value"] >= 0.9 * lam_ref,
                           f"{q['lambada']['value']:.4f} vs {lam_ref:.4f} ({q['lambada']['value'] / lam_ref:.1%})"))
        out.append(f"- **{r['label']}**: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'} ({value})"
                                                      for name, ok, value in checks))
    return out


def fmt_or(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "–"


def plot(table: list[dict], suite: dict, out: Path) -> Path | None:
    pts = [(r["decode_tok_s"], r["quality"]["lambada"]["value"], r) for r in table
           if r.get("decode_tok_s") and "lambada" in r["quality"]]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"dense": "black", "width": "tab:blue", "depth": "tab:red", "both": "tab:purple",
              "unstructured": "tab:green"}
    for x, y, r in pts:
        marker = "o" if r.get("stage") != "distilled" else "^"
        ax.scatter([x], [y], color=colors.get(r.get("method"), "gray"), marker=marker, s=50, zorder=3)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((pts[i] for i in pareto([(x, y) for x, y, _ in pts])), key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", label="Pareto frontier", zorder=2)
    dense = next(((x, y) for x, y, r in pts if r["label"] == suite["dense"]), None)
    if dense:
        ax.scatter([dense[0]], [dense[1]], s=220, facecolors="none", edgecolors="black", linewidths=1.5,
                   label=f"dense q4_0 ({suite['dense']})", zorder=4)
    ax.set_xlabel("decode tokens/s (llama.cpp, batch 1)")
    ax.set_ylabel("LAMBADA accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "decode_vs_lambada.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["time", "quality", "report"])
    ap.add_argument("suite", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--lock", help="time: hold this flock(1) lock file while timing (shared machines)")
    ap.add_argument("--only", help="quality: comma-separated variant labels")
    ap.add_argument("--tasks", help="quality: comma-separated tasks (default: the suite's)")
    args = ap.parse_args()
    suite = load_suite(args.suite)
    args.out.mkdir(parents=True, exist_ok=True)
    {"time": cmd_time, "quality": cmd_quality, "report": cmd_report}[args.command](suite, args.out, args)


if __name__ == "__main__":
    main()
