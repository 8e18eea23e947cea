"""Watch the machine's speed: time two exports back to back (~0.7 s per pair) for a while and print each
pair's medians and ratio. On the project VM this showed two states lasting tens of seconds
(docs/runtime.md, "two-speed host"):

    python benchmarks/tools/host_states.py PIPELINE/exports/structured-50-int8 PIPELINE/exports/dense --seconds 40
"""

import argparse
import time

import numpy as np

from edgeprune.runtime.base import get_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fast_model", help="the smaller model (timed 100 calls per sample)")
    parser.add_argument("reference", help="the dense model (timed 30 calls per sample)")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime = get_runtime("onnxruntime")
    small, dense = (runtime.load(m, threads=args.threads) for m in (args.fast_model, args.reference))
    feeds = {"input_ids": np.random.default_rng(0).integers(1000, 2000, (1, 128)),
             "attention_mask": np.ones((1, 128), np.int64), "token_type_ids": np.zeros((1, 128), np.int64)}
    start = time.time()
    while time.time() - start < args.seconds:
        a = np.median(small.benchmark(feeds, 100, warmup=3)) * 1e3
        b = np.median(dense.benchmark(feeds, 30, warmup=1)) * 1e3
        print(f"{time.time() - start:5.1f}s  small {a:.2f} ms  dense {b:.2f} ms  ratio {b / a:.2f}", flush=True)


if __name__ == "__main__":
    main()
