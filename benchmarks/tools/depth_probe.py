"""Unhealed depth pruning of a decoder: block ranking by each criterion, and perplexity after removing the k
least important blocks (or attention sublayers), all in one model load (blocks are removed with
``edgeprune.compress.depth.bypassed``, which computes exactly what the pruned artifact computes).

    EDGEPRUNE_DATA=/work/shared/data nice -n 19 python benchmarks/tools/depth_probe.py smollm2-135m \
        --counts 2,4,6,8 --criteria bi,ppl -o benchmarks/results/2026-12-02-smollm2-depth/probe.json

Calibration: ``--calib-samples`` windows of ``--calib-length`` tokens of ``--calib`` (seeded);
perplexity: the first ``--max-tokens`` tokens of ``--data`` in non-overlapping ``--window``-token windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--counts", default="2,4,6,8")
    p.add_argument("--criteria", default="bi,ppl", help="comma list of bi, ppl, ppl-iterative, taylor")
    p.add_argument("--unit", default="block", choices=["block", "attention", "ffn"])
    p.add_argument("--calib", default="wikitext2:valid")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-length", type=int, default=256)
    p.add_argument("--data", default="wikitext2:valid")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from edgeprune.compress.api import CalibrationConfig
    from edgeprune.compress.calibration import load_calibration
    from edgeprune.compress.depth import bypassed, select
    from edgeprune.core.data_sources import resolve_data_or_name
    from edgeprune.core.datasets import read_corpus
    from edgeprune.eval.metrics import sliding_window_perplexity
    from edgeprune.core.loading import load_model

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, adapter = loaded.model, loaded.adapter
    calib = load_calibration(loaded, CalibrationConfig(path=args.calib, samples=args.calib_samples,
                                                       max_length=args.calib_length, batch_size=4), seed=0)
    text = read_corpus(resolve_data_or_name(args.data))
    ids = np.asarray(loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens], dtype=np.int64)

    def logits(batch):
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(np.asarray(batch)), use_cache=False).logits.float().numpy()

    def perplexity() -> float:
        return round(sliding_window_perplexity(ids, logits, args.window, args.window)[0], 3)

    counts = [int(c) for c in args.counts.split(",")]
    n = len(adapter.layers(model))
    key = "blocks" if args.unit == "block" else args.unit
    result = {"model": args.model, "unit": args.unit, "blocks": n, "calibration": {
        "data": args.calib, "windows": sum(len(b["input_ids"]) for b in calib),
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in calib))},
        "perplexity": {"data": args.data, "tokens": int(len(ids)), "window": args.window, "stride": args.window},
        "dense_ppl": None, "criteria": {}}
    started = time.perf_counter()
    result["dense_ppl"] = perplexity()
    print(f"dense ppl {result['dense_ppl']}", file=sys.stderr, flush=True)
    for criterion in args.criteria.split(","):
        entry = {"runs": []}
        empty = {"blocks": [], "attention": [], "ffn": []}
        step = time.perf_counter()
        if criterion == "ppl-iterative":  # its order is the ranking: one greedy run to the largest count
            chosen, meta = select(model, adapter, calib, criterion, args.unit, range(n), max(counts), empty)
            order = meta["order"]
            entry["steps"] = meta["steps"]
        else:
            chosen, meta = select(model, adapter, calib, criterion, args.unit, range(n), n - 1, empty)
            scores = meta["scores"]
            order = sorted(scores, key=lambda i: (scores[i], i))
            entry["scores"] = {str(i): round(v, 6) for i, v in scores.items()}
        entry["ranking_low_to_high"] = [int(i) for i in order]
        entry["scoring_s"] = round(time.perf_counter() - step, 1)
        for k in counts:
            drop = sorted(order[:k])
            with bypassed(adapter, model, **{key: drop}):
                ppl = perplexity()
            entry["runs"].append({"removed": k, "indices": drop, "ppl": ppl})
            print(f"{criterion} remove {k}: {drop} ppl {ppl}", file=sys.stderr, flush=True)
        result["criteria"][criterion] = entry
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({c: [(r["removed"], r["ppl"]) for r in e["runs"]] for c, e in result["criteria"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
