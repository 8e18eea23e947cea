"""Which part of an int4-weight SmolLM2 costs the quality? Quantize an fp32 decoder export once with
edgeprune's weight-only path, then score graph edits of that file with the decoder quality gate against the
fp32 export: MatMulNBits accuracy_level 1 (fp32 compute) instead of 4 (int8 activations inside the
kernel), the embedding table back to fp32, the LM head back to fp32. Used for docs/export.md:

    python benchmarks/tools/weight_only_ablation.py EXPORT_DIR --tokens 1024
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def cached(fn):
    """The fp32 reference sees the same windows for every variant: compute each once."""
    memo = {}

    def call(ids):
        key = ids.tobytes()
        if key not in memo:
            memo[key] = fn(ids)
        return memo[key]

    return call


def with_accuracy_level(model, level: int) -> None:
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level


def restore_fp32(model, fp32, which: str) -> None:
    """Put one fp32 weight node back: the embedding Gather or the LM head MatMul."""
    import onnx
    from onnx import numpy_helper

    originals = {t.name: t for t in fp32.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if which == "embedding" and node.op_type == "GatherBlockQuantized":
            name = node.input[0][: -len("_Q4")]
            new = onnx.helper.make_node("Gather", [name, node.input[1]], list(node.output), name=node.name)
            model.graph.initializer.append(originals[name])
        elif which == "lm_head" and node.op_type == "MatMulNBits" and "lm_head" in node.name:
            table = numpy_helper.to_array(originals["model.embed_tokens.weight"]).T.copy()
            weight = numpy_helper.from_array(table, "lm_head_fp32")
            model.graph.initializer.append(weight)
            new = onnx.helper.make_node("MatMul", [node.input[0], weight.name], list(node.output), name=node.name)
        else:
            continue
        model.graph.node.remove(node)
        model.graph.node.insert(i, new)
        return
    raise SystemExit(f"no {which} node found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--data", default="/work/shared/data/wikitext-2/valid.txt")
    parser.add_argument("--variants", type=int, default=4, help="score only the first N variants")
    args = parser.parse_args()

    import onnx
    from transformers import AutoTokenizer

    from edgeprune.core.artifacts import read_manifest
    from edgeprune.exporters.decoder_gate import decoder_quality_gate
    from edgeprune.exporters.quantize import WeightOnlySpec, quantize_weight_only
    from edgeprune.exporters.validate import ort_logits_fn

    src = Path(args.export_dir) / "model.onnx"
    layout = read_manifest(args.export_dir)["kv_layout"]
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    text = Path(args.data).read_text()[-args.tokens * 16:]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][-args.tokens:], dtype=np.int64)
    reference = cached(ort_logits_fn(src, layout))
    fp32 = onnx.load(str(src))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "q.onnx"
        started = time.perf_counter()
        info = quantize_weight_only(src, base, WeightOnlySpec(bits=args.bits, block_size=args.block_size,
                                                              symmetric=not args.asymmetric, accuracy_level=4,
                                                              embeddings=True, algorithm="rtn", head_bits=args.bits))
        print(json.dumps({"quantize_s": round(time.perf_counter() - started, 1), **info}), flush=True)
        bits = f"int{args.bits}"
        variants = [(f"{bits} acc4", 4, None), (f"{bits} acc1", 1, None),
                    (f"{bits} acc1, embedding fp32", 1, "embedding"), (f"{bits} acc1, lm_head fp32", 1, "lm_head")]
        for label, level, restore in variants[: args.variants]:
            model = onnx.load(str(base))
            with_accuracy_level(model, level)
            if restore:
                restore_fp32(model, fp32, restore)
            path = Path(tmp) / "variant.onnx"
            onnx.save(model, str(path))
            started = time.perf_counter()
            report = decoder_quality_gate(reference, ort_logits_fn(path, layout), ids, window=512,
                                          max_ppl_ratio=1.05, min_greedy_agreement=0.75)
            print(json.dumps({"variant": label, "bits": args.bits, "block_size": args.block_size, "symmetric": not args.asymmetric,
                              "ppl_fp32": report["perplexity"]["reference"], "ppl": report["perplexity"]["candidate"],
                              "ratio": report["perplexity"]["ratio"], "greedy": report["greedy"]["agreement"],
                              "exact_prefix": report["greedy"]["exact_prefix"],
                              "window_top1": report["window_top1_agreement"], "passed": report["passed"],
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
