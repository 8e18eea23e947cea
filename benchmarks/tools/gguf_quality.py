"""GGUF quality against PyTorch fp32 on identical tokens: the perplexity targets of issue 17 and the
distributions the GGUF gate tolerances (``edgeprune.exporters.gguf_api.GATE``) are calibrated from.

One PyTorch model, one tokenization (the Hugging Face tokenizer), the same windows for every file:

* ``--ppl-tokens`` (8192) tokens from the *start* of WikiText-2 valid, windows of 512, stride 256
  (``edgeprune eval``'s sliding window): perplexity of PyTorch fp32 and of every GGUF file through the
  project's llama.cpp runtime;
* ``--chunks`` (6) disjoint 1,024-token chunks from the middle of the file (never the scored head, never the
  export gate's own tail): the export gate's exact measurement (``decoder_quality_gate``, window 512,
  32-token greedy path) per chunk and type, i.e. the spread a tolerance has to cover.

The files scored are the ``--gguf`` paths given plus, with ``--write-types``, each type written here by
edgeprune's own GGUF writer from the one loaded model (no gate, so any type can be measured).

    python benchmarks/tools/gguf_quality.py smollm2-135m --gguf A.gguf --gguf B.gguf \
        --write-types f32,f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0 -o RESULTS.json
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def nll_per_window(logits_fn, ids: np.ndarray, window: int, stride: int) -> list[np.ndarray]:
    """Per-token NLLs of each window's newly scored positions (exactly ``sliding_window_perplexity``'s)."""
    from edgeprune.eval.metrics import token_nll

    out, previous_end = [], 0
    for start in range(0, max(len(ids) - 1, 1), stride):
        end = min(start + window, len(ids))
        chunk = ids[start:end]
        new_from = max(previous_end, start + 1)
        logits = logits_fn(chunk[None, :])[0]
        positions = np.arange(new_from - 1 - start, len(chunk) - 1)
        out.append(np.asarray(token_nll(logits[positions], chunk[positions + 1]), dtype=np.float64))
        previous_end = end
        if end == len(ids):
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the PyTorch reference (alias, HF dir, .gguf source, artifact)")
    parser.add_argument("--gguf", action="append", default=[], help="a GGUF file to score (repeatable)")
    parser.add_argument("--write-types", default="", help="comma-separated GGUF types to write and score")
    parser.add_argument("--data", default="/work/shared/data/wikitext-2/valid.txt")
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512, help="both measurements (the gate's GATE_WINDOW)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()

    from tqdm.auto import tqdm

    from edgeprune.core.datasets import read_corpus
    from edgeprune.exporters.decoder_gate import greedy_path
    from edgeprune.exporters.gguf_api import torch_logits
    from edgeprune.core.ggufio import export_loaded
    from edgeprune.core.loading import load_model
    from edgeprune.runtime.base import get_runtime

    started = time.perf_counter()
    loaded = load_model(args.model, task="text-generation")
    reference = torch_logits(loaded.model)
    ids = np.asarray(loaded.tokenizer(read_corpus(args.data), add_special_tokens=False)["input_ids"], dtype=np.int64)
    head = ids[:args.ppl_tokens]
    # chunks spread over the middle of the file: after the scored head, before the gate's default tail
    middle = ids[args.ppl_tokens:len(ids) - 2 * args.chunk_tokens]
    step = (len(middle) - args.chunk_tokens) // max(args.chunks, 1)
    chunks = [middle[i * step:i * step + args.chunk_tokens] for i in range(args.chunks)]

    files = {Path(p).name if Path(p).name != "model.gguf" else Path(p).parent.name: Path(p) for p in args.gguf}
    scratch = tempfile.TemporaryDirectory(prefix="gguf-quality-")  # the written types are removed at exit
    tmp = Path(scratch.name)
    for qtype in [t for t in args.write_types.split(",") if t]:
        path = tmp / f"edgeprune-{qtype}.gguf"
        export_loaded(loaded, path, qtype, progress=False)
        files[f"written {qtype}"] = path
    runtime = get_runtime("llamacpp")
    window, prompt_len, steps = args.window, 32, 32
    results = {"model": args.model, "data": args.data, "ppl_tokens": int(len(head)), "window": window,
               "stride": window // 2, "files": {n: str(p) for n, p in files.items()},
               "bytes": {n: p.stat().st_size for n, p in files.items()}, "perplexity": {}, "gate": {}}
    flat_ref = np.concatenate(nll_per_window(reference, head, window, window // 2))
    results["perplexity"]["PyTorch fp32"] = {"ppl": math.exp(flat_ref.mean()), "tokens": int(flat_ref.size)}
    # The gate's two numbers per chunk (decoder_gate's definitions): the reference side is
    # computed once and kept as NLLs and a greedy path, so no logits are held while the files are scored.
    ref_chunks = []
    for chunk in tqdm(chunks, desc="reference chunks"):
        ref_chunks.append((np.concatenate(nll_per_window(reference, chunk, window, window // 2)),
                           greedy_path(reference, chunk[:prompt_len], steps)))
    for name, path in tqdm(files.items(), desc="files"):
        session = runtime.load(str(path), threads=args.threads)  # one at a time: bounded memory
        try:
            flat = np.concatenate(nll_per_window(session.logits, head, window, window // 2))
            results["perplexity"][name] = {"ppl": math.exp(flat.mean()), "tokens": int(flat.size),
                                           "ratio_vs_fp32": math.exp(flat.mean() - flat_ref.mean())}
            for c, (chunk, (ref_nll, greedy)) in enumerate(zip(chunks, ref_chunks)):
                cand_nll = np.concatenate(nll_per_window(session.logits, chunk, window, window // 2))
                forced = np.concatenate([chunk[:prompt_len], np.asarray(greedy[:-1], dtype=np.int64)])[None, :]
                top1 = session.logits(forced)[0, prompt_len - 1:].argmax(-1).tolist()
                agrees = [int(a == b) for a, b in zip(greedy, top1)]
                results["gate"].setdefault(name, []).append(
                    {"chunk": c, "ratio": math.exp(cand_nll.mean() - ref_nll.mean()),
                     "greedy": sum(agrees) / len(agrees),
                     "exact_prefix": next((i for i, ok in enumerate(agrees) if not ok), len(agrees))})
        finally:
            session.close()
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")

    print(f"| file | bytes | perplexity ({len(head)} tokens) | ratio vs fp32 | gate ratio min/median/max "
          f"({args.chunks} x {args.chunk_tokens} tokens) | greedy agreement min/median/max |")
    print("|---|---|---|---|---|---|")
    print(f"| PyTorch fp32 | – | {results['perplexity']['PyTorch fp32']['ppl']:.3f} | 1 | – | – |")
    for name in files:
        p, g = results["perplexity"][name], results["gate"][name]
        r = [x["ratio"] for x in g]
        a = [x["greedy"] for x in g]
        print(f"| {name} | {results['bytes'][name]:,} | {p['ppl']:.3f} | {p['ratio_vs_fp32']:.4f} | "
              f"{min(r):.4f} / {np.median(r):.4f} / {max(r):.4f} | {min(a):.3f} / {np.median(a):.3f} / {max(a):.3f} |")


if __name__ == "__main__":
    main()
