"""Same-process, interleaved onnxruntime A/B of ONNX files (or export dirs), batch 1, seq 128, 2 threads.

Each argument is PATH[:OPTIMIZERS], OPTIMIZERS a comma list of ORT optimizers to disable ('-' for none, i.e.
ORT's own defaults); without it a session gets edgeprune's defaults. The first argument is the reference.
Used for the ablations in docs/export.md (shape folding) and docs/runtime.md (SkipLayerNormFusion):

    python benchmarks/tools/ort_ab.py DENSE/model.onnx S50_INT8/model.onnx:- S50_INT8/model.onnx
"""

import argparse

import numpy as np

from edgeprune.runtime.base import get_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-seconds", type=float, default=0.4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime = get_runtime("onnxruntime")
    sessions = []
    for spec in args.models:
        path, _, disabled = spec.partition(":")
        options = {} if not disabled else {"disabled_optimizers": () if disabled == "-" else tuple(disabled.split(","))}
        sessions.append(runtime.load(path, threads=args.threads, **options))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000, 2000, (1, args.seq)), "attention_mask": np.ones((1, args.seq), np.int64),
             "token_type_ids": np.zeros((1, args.seq), np.int64)}
    # calls per round from a warm-up, so each round times ~round_seconds of back-to-back calls
    calls = [max(1, int(args.round_seconds / np.median(s.benchmark(feeds, 5, warmup=2)))) for s in sessions]
    times = [[] for _ in sessions]
    for _ in range(args.rounds):
        for session, n, record in zip(sessions, calls, times):
            record.extend(session.benchmark(feeds, n))
    reference = np.median(times[0])
    for spec, record in zip(args.models, times):
        p50 = np.median(record)
        print(f"{spec[-70:]:70s} p50 {p50 * 1e3:7.2f} ms  speedup {reference / p50:5.2f}x  n={len(record)}")


if __name__ == "__main__":
    main()
