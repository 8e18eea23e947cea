"""``edgeprune pipeline`` and ``edgeprune sweep`` (compress -> export -> bench). Parsing only; work happens
lazily."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("pipeline", formatter_class=fmt,
                              help="compress -> export -> bench from a YAML recipe (default: MiniLM variants)")
    p.add_argument("recipe", nargs="?", help="pipeline YAML (default: the built-in MiniLM recipe)")
    p.add_argument("-o", "--output", required=True, help="output directory (variants, exports, report)")
    p.add_argument("--threads", type=int, help="override the recipe's benchmark threads")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_pipeline)

    p = subparsers.add_parser("sweep", formatter_class=fmt,
                              help="Pareto sweep over pruning levels, and pick a variant by quality or latency budget")
    p.add_argument("recipe", nargs="?", help="sweep YAML (default: MiniLM heads+FFN 0..70%%)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--min-quality", type=float, help="fastest variant with quality >= this fraction of dense (e.g. 0.98)")
    p.add_argument("--max-latency-ms", type=float, help="best-quality variant with p50 <= this many ms")
    p.add_argument("--threads", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_sweep)


def run_pipeline(args) -> int:
    from edgeprune.pipeline import PipelineConfig, default_recipe, run_pipeline as run
    from edgeprune.core.console import print_json_last

    from pathlib import Path

    config = PipelineConfig.from_file(args.recipe) if args.recipe else default_recipe()
    result = run(config, args.output, overwrite=args.overwrite, threads=args.threads,
                 recipe_dir=Path(args.recipe).resolve().parent if args.recipe else None)
    if args.json:
        print_json_last(result)
    return 0


def run_sweep(args) -> int:
    from edgeprune.pipeline import SweepConfig, default_sweep, run_sweep as run
    from edgeprune.core.console import print_json_last

    config = SweepConfig.from_file(args.recipe) if args.recipe else default_sweep()
    result = run(config, args.output, min_quality=args.min_quality, max_latency_ms=args.max_latency_ms,
                 overwrite=args.overwrite, threads=args.threads)
    if args.json:
        print_json_last(result)
    if "budget" in result and result["chosen"] is None:  # a budget nothing met is not a success
        import sys

        budget = ", ".join(f"{flag} {value}" for flag, value in (("--min-quality", args.min_quality),
                                                                ("--max-latency-ms", args.max_latency_ms))
                           if value is not None)
        print(f"edgeprune: error: no variant meets the budget ({budget}); the sweep's measurements are in "
              f"{args.output}/sweep.json", file=sys.stderr)
        return 1
    return 0
