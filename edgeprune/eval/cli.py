"""``edgeprune eval``."""

from __future__ import annotations

from edgeprune.data_sources import TASK_DEFAULT_DATA as DEFAULT_DATA


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model, artifact or export on STS or perplexity")
    p.add_argument("model", help="alias, model dir, .gguf, compressed artifact or exported ONNX directory")
    p.add_argument("--task", choices=["sts", "perplexity"], required=True)
    p.add_argument("--data", help="a file (STS-B tsv for sts, text for perplexity) or a built-in data key "
                   "(`edgeprune data list`); default: the task's dev set, "
                   + ", ".join(f"{task} -> {key}" for task, key in DEFAULT_DATA.items()))
    p.add_argument("--runtime", default=None, help="evaluate through a runtime (onnxruntime, deepsparse) instead of PyTorch")
    p.add_argument("--limit", type=int, help="STS: use only the first N pairs")
    p.add_argument("--max-tokens", type=int, default=20000, help="perplexity: tokens to score")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, help="intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from edgeprune.cli import print_json_last
    from edgeprune.errors import check_minimums
    from edgeprune.eval.api import EvalConfig, evaluate

    check_minimums(args, threads=1)

    config = EvalConfig(task=args.task, limit=args.limit, max_tokens=args.max_tokens, window=args.window,
                        stride=args.stride, batch_size=args.batch_size)
    data = args.data or DEFAULT_DATA[args.task]
    result = evaluate(args.model, data, config, runtime=args.runtime, threads=args.threads, progress=True)
    print(f"{result['task']}: {result['metric']} = {result['value']:.4f} (n={result['n']}, {result['backend']}, "
          f"{result['seconds']}s)")
    if args.json:
        print_json_last(result)
    return 0
