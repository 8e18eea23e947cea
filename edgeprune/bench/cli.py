"""``edgeprune bench``. Parsing only; work happens lazily."""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("bench", formatter_class=fmt,
                              help="benchmark a dense model against candidates (size, latency, memory, energy, quality)")
    p.add_argument("--dense", required=True, help="the reference: export dir, .onnx, or a model/artifact to export (fp32)")
    p.add_argument("--candidate", action="append", default=[], help="a candidate (repeatable), same forms as --dense")
    p.add_argument("--label", action="append", help="display names, one per model in order dense, candidates...")
    p.add_argument("--runtime", type=_names, default="onnxruntime", help="comma-separated runtimes")
    p.add_argument("--batch", type=_ints, default="1", help="comma-separated batch sizes")
    p.add_argument("--seq", type=_ints, default="128", help="comma-separated sequence lengths (decoders: prompt length)")
    p.add_argument("--threads", type=int, help="intra-op threads for every model")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per shape")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and shape")
    p.add_argument("--round-seconds", type=float, default=0.25, help="target timed seconds per model per round")
    p.add_argument("--new-tokens", type=int, default=16, help="decoders: KV-cache decode steps per round")
    p.add_argument("--task", choices=["sts", "perplexity", "lambada", "hellaswag", "piqa"], help="also measure quality")
    p.add_argument("--data", help="a file (STS-B tsv for sts, text for perplexity, task jsonl) or a built-in data "
                   "key; default: the task's dev set (stsb:dev, wikitext2:valid, TASK:dev)")
    p.add_argument("--eval-limit", type=int, help="sts / zero-shot tasks: first N pairs or items only")
    p.add_argument("--eval-max-tokens", type=int, default=20000, help="perplexity: tokens scored")
    p.add_argument("--watts-per-core", type=float, default=4.0,
                   help="power per busy core for the energy estimate when RAPL is unreadable")
    p.add_argument("-o", "--output", required=True, help="report directory to create")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from edgeprune.bench.api import bench
    from edgeprune.bench.harness import BenchConfig
    from edgeprune.bench.report import markdown
    from edgeprune.core.console import print_json_last
    from edgeprune.core.data_sources import TASK_DEFAULT_DATA
    from edgeprune.core.errors import check_minimums

    check_minimums(args, eval_limit=2, eval_max_tokens=2)
    config = BenchConfig(runtimes=args.runtime, batches=args.batch, seqs=args.seq, threads=args.threads,
                         rounds=args.rounds, warmup=args.warmup, round_seconds=args.round_seconds,
                         new_tokens=args.new_tokens, task=args.task,
                         data=args.data or (TASK_DEFAULT_DATA[args.task] if args.task else None), eval_limit=args.eval_limit,
                         eval_max_tokens=args.eval_max_tokens, watts_per_core=args.watts_per_core)
    report = bench(args.dense, args.candidate, args.output, config, overwrite=args.overwrite, labels=args.label)
    print(markdown(report))
    print(f"wrote {args.output}/report.json, report.md" + "".join(f", {p}" for p in report.get("plots", [])))
    if args.json:
        print_json_last({"output": args.output, "comparisons": report["comparisons"]})
    return 0
