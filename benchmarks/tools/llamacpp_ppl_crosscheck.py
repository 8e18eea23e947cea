"""Upstream ``llama-perplexity``'s number, recomputed through edgeprune's llama.cpp runtime.

llama-perplexity tokenizes the whole file with llama.cpp's tokenizer (BOS first when the model adds one),
cuts it into ``-c`` token chunks, puts BOS at the start of each chunk, and scores only the second half of
each chunk (positions ``c/2 .. c-2`` predicting the next token). This does exactly that with
``edgeprune.runtime`` (``LlamaCppSession.encode`` / ``logits``), so the two numbers should agree to the
kernels' noise: a check that the adapter feeds llama.cpp the way its own tool does.

    python benchmarks/tools/llamacpp_ppl_crosscheck.py MODEL.gguf TEXT --ctx 512 --chunks 4
    llama-perplexity -m MODEL.gguf -f TEXT -c 512 --chunks 4 -t 2          # the upstream number
"""

import argparse
import json
import math

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("text")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from edgeprune.eval.metrics import token_nll
    from edgeprune.runtime.base import get_runtime

    session = get_runtime("llamacpp").load(args.gguf, threads=args.threads)
    try:
        with open(args.text, encoding="utf-8") as handle:
            tokens = session.encode(handle.read(), add_special_tokens=True)
        bos = int(session.llm.token_bos())
        adds_bos = bool(tokens) and tokens[0] == bos
        first, nll, count, per_chunk = args.ctx // 2, 0.0, 0, []
        for chunk in range(min(args.chunks, len(tokens) // args.ctx)):
            ids = list(tokens[chunk * args.ctx:(chunk + 1) * args.ctx])
            if adds_bos:
                ids[0] = bos
            logits = session.logits(np.asarray([ids], dtype=np.int64))[0]
            positions = np.arange(first, args.ctx - 1)
            values = token_nll(logits[positions], np.asarray(ids, dtype=np.int64)[positions + 1])
            nll += float(np.sum(values))
            count += len(positions)
            per_chunk.append(math.exp(nll / count))
    finally:
        session.close()
    print(json.dumps({"gguf": args.gguf, "ctx": args.ctx, "chunks": len(per_chunk), "bos": adds_bos,
                      "running_ppl": [round(p, 4) for p in per_chunk], "ppl": per_chunk[-1], "tokens": count}))


if __name__ == "__main__":
    main()
