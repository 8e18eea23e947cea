"""Zero-shot scoring with the LM head at the scored positions only vs over every position: same scores on
real items, and the time of each (interleaved, medians), plus a batch-shape sweep of the fast path.

    python benchmarks/tools/zeroshot_speed.py out/smollm2-onnx --torch-model smollm2-135m --check-items 40 \\
        --time-items 200 --repeats 3 --shapes 16x1024,32x2048,64x4096

``--check-items``: the first N LAMBADA items scored both ways through onnxruntime (and PyTorch with
``--torch-model``); prints the largest log-probability difference and whether every greedy decision agrees.
``--time-items``: the first N items timed full vs fast, alternating, ``--repeats`` times each.
``--shapes``: ``BATCHxTOKENS`` settings (``--batch-size`` x ``batch_tokens``) timed on the fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


class FullLogitsOnly:
    """The backend without ``target_logits``: the scorer falls back to logits at every position."""

    def __init__(self, backend):
        self.batch_logits = backend.batch_logits


def compare(backend, requests, batch_size: int, batch_tokens: int) -> dict:
    import numpy as np

    from edgeprune.eval.zeroshot import score_requests

    fast = score_requests(backend, requests, batch_size, batch_tokens, backend.pad_id)
    full = score_requests(FullLogitsOnly(backend), requests, batch_size, batch_tokens, backend.pad_id)
    diff = np.abs(np.array([f[0] for f in fast]) - np.array([f[0] for f in full]))
    return {"n": len(requests), "max_abs_logprob_diff": float(diff.max()),
            "greedy_identical": [f[1] for f in fast] == [f[1] for f in full],
            "acc_fast": float(np.mean([f[1] for f in fast])), "acc_full": float(np.mean([f[1] for f in full]))}


def timed(backend, requests, batch_size: int, batch_tokens: int) -> float:
    from edgeprune.eval.zeroshot import score_requests

    started = time.perf_counter()
    score_requests(backend, requests, batch_size, batch_tokens, getattr(backend, "pad_id", 0) or 0)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--torch-model", help="also check PyTorch's fast path on this model (alias or path)")
    parser.add_argument("--data", default=None, help="LAMBADA jsonl (default lambada:dev)")
    parser.add_argument("--check-items", type=int, default=40)
    parser.add_argument("--time-items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="32x2048")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from edgeprune.eval.api import resolve_task_data
    from edgeprune.eval.zeroshot import item_requests, read_items
    from edgeprune.eval.backends import RuntimeBackend

    data = resolve_task_data("lambada", args.data)
    items = read_items("lambada", data, limit=max(args.check_items, args.time_items))
    report = {"cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                           if l.startswith("model name")), "unknown"), "load_average_start": os.getloadavg(),
              "threads": args.threads}
    backend = RuntimeBackend(args.export_dir, "onnxruntime", threads=args.threads)
    requests = item_requests(backend, items, backend.max_positions, backend.prefix_token_id)
    report["tokens_timed"] = sum(len(r.tokens) for r in requests[:args.time_items])
    if args.check_items:
        report["check_onnxruntime"] = compare(backend, requests[:args.check_items], 32, 2048)
        print("onnxruntime fast vs full:", report["check_onnxruntime"], flush=True)
    if args.time_items:
        subset = requests[:args.time_items]
        timed(backend, subset[:8], 8, 2048)  # warm-up: the headless session loads on first use
        times = {"full": [], "fast": []}
        for _ in range(args.repeats):  # interleaved, so both modes see the same machine
            times["full"].append(timed(FullLogitsOnly(backend), subset, 32, 2048))
            times["fast"].append(timed(backend, subset, 32, 2048))
            print("times so far:", times, flush=True)
        report["times_s"] = times
        report["median_s"] = {k: statistics.median(v) for k, v in times.items()}
        report["speedup"] = report["median_s"]["full"] / report["median_s"]["fast"]
        shapes = {}
        for shape in args.shapes.split(","):
            size, tokens = (int(x) for x in shape.split("x"))
            shapes[shape] = timed(backend, subset, size, tokens)
            print(f"fast {shape}: {shapes[shape]:.1f} s", flush=True)
        report["fast_by_shape_s"] = shapes
    backend.close()
    if args.torch_model and args.check_items:
        from edgeprune.eval.api import make_backend

        torch_backend = make_backend(args.torch_model, None, "lambada", 128, args.threads)
        torch_requests = item_requests(torch_backend, items[:args.check_items], torch_backend.max_positions,
                                       torch_backend.prefix_token_id)
        assert torch_backend._head_split() is not None, "PyTorch fast path not taken"
        report["check_pytorch"] = compare(torch_backend, torch_requests, 32, 2048)
        print("pytorch fast vs full:", report["check_pytorch"], flush=True)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
