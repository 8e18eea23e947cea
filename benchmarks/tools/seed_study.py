"""The seed study on SmolLM2-135M: which zero-shot tasks survive pruning, and which degrade first.

    benchmarks/run.sh OUT seed-study                       # the full study (defaults below)
    python benchmarks/tools/seed_study.py OUT [--limit 300] [--finetune-steps 25] [--distill-steps 50]

Points: dense, then 10/20/30/40/50 % removed by
  (a) ``unstructured``: global magnitude over the decoder-block matrices, iterative: each point starts from
      the previous one (its zeros stay zero, as the smallest magnitudes), removes 10 % more and fine-tunes
      ``--finetune-steps`` steps on the LM loss with the masks held (the seed paper's protocol);
  (b) ``structured``: heads (whole KV groups) + FFN neurons with the best post-training recipe
      (edgeprune/recipes/smollm2-25-distill.yaml without its fine-tuning: Fisher importance, joint search
      under a FLOPs budget of 1 - fraction at seq_len 1 = fraction of block parameters, scale re-fit), and
      the recipe's distillation (``--distill-steps``) at ``--distill-level``.
Each point: WikiText-2 valid perplexity (first ``--ppl-tokens`` tokens; fine-tuning reads the text after its
first 25,000 tokens, so training and scored text are disjoint), LAMBADA acc, HellaSwag acc_norm, PIQA acc
(first ``--limit`` items of each dev file, 300 by default), all through PyTorch, seeded.

Writes OUT/points.jsonl (one line per point as it finishes), OUT/study.json, OUT/table.md, OUT/retention.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

TASKS = ("perplexity", "lambada", "hellaswag", "piqa")
RECIPE = Path(__file__).resolve().parents[2] / "edgeprune" / "recipes" / "smollm2-25-distill.yaml"


def evaluate_point(model: str, args, data: dict[str, Path]) -> dict:
    from edgeprune.eval.api import EvalConfig, evaluate

    out = {}
    for task in TASKS:
        config = (EvalConfig(task=task, max_tokens=args.ppl_tokens) if task == "perplexity"
                  else EvalConfig(task=task, limit=args.limit, batch_size=args.batch_size))
        result = evaluate(model, data[task], config, threads=args.threads, progress=True)
        out[task] = {k: result[k] for k in ("metric", "value", "acc", "acc_norm", "perplexity", "n", "seconds")
                     if k in result}
    return out


def finetune_config(args, steps: int, distill: bool):
    from edgeprune.compress.api import CompressConfig

    recipe = CompressConfig.from_file(RECIPE).finetune  # the distillation recipe's optimiser settings
    return recipe.replace(data=str(args.data["finetune"]), max_steps=steps, distill=distill)


def unstructured_point(source: str, out: Path, fraction: float, args):
    from edgeprune.compress.api import CompressConfig, compress
    from edgeprune.compress.plan import StructuredConfig
    from edgeprune.compress.api import SparsityConfig

    config = CompressConfig(structured=StructuredConfig(heads=0.0, ffn=0.0),
                            sparsity=SparsityConfig(fraction=fraction, scope="global"),
                            finetune=finetune_config(args, args.finetune_steps, distill=False), seed=args.seed)
    if args.finetune_steps == 0:
        config = config.replace(finetune=config.finetune.replace(data=None))
    compress(source, out, config, overwrite=True)


def structured_point(out: Path, fraction: float, args, distill_steps: int = 0):
    from edgeprune.compress.api import CompressConfig, compress

    base = CompressConfig.from_file(RECIPE)
    config = base.replace(structured=base.structured.replace(flops_budget=round(1.0 - fraction, 6)),
                          calibration=base.calibration.replace(path=str(args.data["calibration"])),
                          finetune=(finetune_config(args, distill_steps, distill=True) if distill_steps
                                    else base.finetune.replace(data=None)),
                          seed=args.seed)
    compress(args.model, out, config, overwrite=True)


def retention(point: dict, dense: dict, task: str) -> float:
    value, reference = point[task]["value"], dense[task]["value"]
    return reference / value if task == "perplexity" else value / reference


def write_outputs(out: Path, points: list[dict], args, machine: dict) -> None:
    dense = next(p for p in points if p["method"] == "dense")["scores"]
    lines = ["| method | removed | fine-tuning | WikiText-2 ppl | LAMBADA acc | HellaSwag acc_norm | PIQA acc | "
             "retention ppl / LAMBADA / HellaSwag / PIQA |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        s = p["scores"]
        ret = " / ".join(f"{retention(s, dense, t):.1%}" for t in TASKS)
        lines.append(f"| {p['method']} | {p['fraction']:.0%} | {p['finetune']} | {s['perplexity']['value']:.2f} | "
                     f"{s['lambada']['value']:.4f} | {s['hellaswag']['value']:.4f} | {s['piqa']['value']:.4f} | {ret} |")
    table = "\n".join(lines) + "\n"
    study = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "data"},
             "data": {k: str(v) for k, v in args.data.items()}, "machine": machine, "points": points}
    for name, text in (("table.md", table), ("study.json", json.dumps(study, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(out / "retention.png", points, dense)


def plot(path: Path, points: list[dict], dense: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"perplexity": "tab:gray", "lambada": "tab:red", "hellaswag": "tab:blue", "piqa": "tab:green"}
    names = {"perplexity": "WikiText-2 (dense ppl / ppl)", "lambada": "LAMBADA acc", "hellaswag": "HellaSwag acc_norm",
             "piqa": "PIQA acc"}
    for method, style in (("unstructured", "-o"), ("structured", "--s")):
        series = sorted((p for p in points if p["method"] == method), key=lambda p: p["fraction"])
        if not series:
            continue
        for task in TASKS:
            xs = [0.0] + [p["fraction"] * 100 for p in series]
            ys = [1.0] + [retention(p["scores"], dense, task) for p in series]
            ax.plot(xs, ys, style, color=colors[task], label=f"{names[task]}, {method}", markersize=4)
    for p in points:
        if p["method"] == "structured+distill":
            for task in TASKS:
                ax.plot([p["fraction"] * 100], [retention(p["scores"], dense, task)], "*", color=colors[task],
                        markersize=11, label=f"{names[task]}, structured + distillation")
    ax.set_xlabel("% of decoder-block weights removed")
    ax.set_ylabel("fraction of dense quality retained")
    ax.set_title("SmolLM2-135M: task retention vs pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--methods", default="unstructured,structured")
    parser.add_argument("--limit", type=int, default=300,
                        help="first N items of each zero-shot dev file (0: all; the full HellaSwag dev is 20,000 "
                             "forward passes per point)")
    parser.add_argument("--ppl-tokens", type=int, default=20000)
    parser.add_argument("--finetune-steps", type=int, default=50,
                        help="recovery fine-tuning steps (4 x 128 tokens) after each 10 %% unstructured step")
    parser.add_argument("--distill-steps", type=int, default=300, help="distillation steps at --distill-level")
    parser.add_argument("--distill-level", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-models", action="store_true", help="keep every pruned checkpoint (0.5 GB each)")
    args = parser.parse_args(argv)

    import torch

    from edgeprune.core.data_sources import resolve_data
    from edgeprune.eval.api import resolve_task_data

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    levels = [float(x) for x in args.levels.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    args.limit = args.limit or None
    args.data = {"perplexity": resolve_data("wikitext2:valid"), "finetune": resolve_data("wikitext2:valid"),
                 "calibration": resolve_data("stsb:train"),
                 **{t: resolve_task_data(t, None) for t in ("lambada", "hellaswag", "piqa")}}
    out = Path(args.output)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                            if l.startswith("model name")), "unknown"),
               "cores": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    points: list[dict] = []

    def record(method: str, fraction: float, model: str, finetune: str, build_s: float) -> None:
        started = time.perf_counter()
        scores = evaluate_point(model, args, args.data)
        point = {"method": method, "fraction": fraction, "finetune": finetune, "scores": scores,
                 "build_s": round(build_s, 1), "eval_s": round(time.perf_counter() - started, 1),
                 "load_average": list(os.getloadavg())}
        points.append(point)
        with open(out / "points.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")
        print(f"[seed-study] {method} {fraction:.0%}: " + ", ".join(
            f"{t} {scores[t]['value']:.4f}" for t in TASKS) + f" (build {build_s:.0f} s, eval {point['eval_s']:.0f} s)",
            flush=True)

    (out / "points.jsonl").unlink(missing_ok=True)
    record("dense", 0.0, args.model, "-", 0.0)
    if "unstructured" in methods:
        source = args.model
        for level in levels:
            target = models / f"unstructured-{round(level * 100)}"
            started = time.perf_counter()
            unstructured_point(source, target, level, args)
            record("unstructured", level, str(target), f"{args.finetune_steps} steps LM", time.perf_counter() - started)
            if source != args.model and not args.keep_models:
                shutil.rmtree(source, ignore_errors=True)
            source = str(target)
        if source != args.model and not args.keep_models:
            shutil.rmtree(source, ignore_errors=True)
    if "structured" in methods:
        for level in levels:
            target = models / f"structured-{round(level * 100)}"
            started = time.perf_counter()
            structured_point(target, level, args)
            record("structured", level, str(target), "none (post-training)", time.perf_counter() - started)
            if not args.keep_models:
                shutil.rmtree(target, ignore_errors=True)
        if args.distill_steps:
            target = models / f"structured-{round(args.distill_level * 100)}-distilled"
            started = time.perf_counter()
            structured_point(target, args.distill_level, args, args.distill_steps)
            record("structured+distill", args.distill_level, str(target), f"{args.distill_steps} steps distillation",
                   time.perf_counter() - started)
            if not args.keep_models:
                shutil.rmtree(target, ignore_errors=True)
    machine["load_average_end"] = list(os.getloadavg())
    write_outputs(out, points, args, machine)
    print((out / "table.md").read_text())
    print(f"wrote {out}/study.json, table.md, retention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
