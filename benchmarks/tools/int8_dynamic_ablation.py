"""Why does INT8-dynamic break SmolLM2? Quantize an fp32 decoder export with onnxruntime's quantize_dynamic
(as ``edgeprune export --quantize int8-dynamic`` does) while keeping one class of weight nodes fp32 at a time,
and score each file with the decoder quality gate against the fp32 export (perplexity ratio, greedy
agreement, window top-1 agreement). Used for docs/export.md:

    python benchmarks/tools/int8_dynamic_ablation.py EXPORT_DIR --tokens 2048
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def classes(model) -> dict[str, list[str]]:
    """Weight nodes by role, from optimum's module-path node names (/model/layers.N/mlp/down_proj/MatMul)."""
    constants = {t.name for t in model.graph.initializer}
    weight = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Gather") and any(i in constants for i in n.input)]
    groups = {
        "lm_head": [n.name for n in weight if "lm_head" in n.name or "logits" in n.output],
        "embedding_gather": [n.name for n in weight if n.op_type == "Gather"],
        "attention_qkv": [n.name for n in weight if any(p in n.name for p in ("q_proj", "k_proj", "v_proj"))],
        "attention_o": [n.name for n in weight if "o_proj" in n.name],
        "mlp_gate_up": [n.name for n in weight if "gate_proj" in n.name or "up_proj" in n.name],
        "mlp_down": [n.name for n in weight if "down_proj" in n.name],
    }
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--data", default="/work/shared/data/wikitext-2/valid.txt")
    parser.add_argument("--keep-fp32", nargs="+", default=["lm_head", "embedding_gather", "mlp_down"],
                        help="node classes to keep fp32, one variant each (see classes())")
    args = parser.parse_args()

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from edgeprune.artifacts import read_manifest
    from edgeprune.exporters.decoder_gate import decoder_quality_gate
    from edgeprune.exporters.quantize import DYNAMIC_OPS, _extra_options, _quiet
    from edgeprune.exporters.validate import ort_logits_fn

    _quiet()
    src = Path(args.export_dir) / "model.onnx"
    layout = read_manifest(args.export_dir)["kv_layout"]
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    text = Path(args.data).read_text()[-args.tokens * 16:]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][-args.tokens:], dtype=np.int64)
    groups = classes(onnx.load(str(src), load_external_data=False))
    print(json.dumps({k: len(v) for k, v in groups.items()}))
    reference = ort_logits_fn(src, layout)
    variants = [("all quantized", [])] + [(f"{name} fp32", groups[name]) for name in args.keep_fp32]
    variants.append(("only lm_head quantized", [n for k, v in groups.items() if k != "lm_head" for n in v]))
    with tempfile.TemporaryDirectory() as tmp:
        for label, exclude in variants:
            started = time.perf_counter()
            dst = Path(tmp) / "q.onnx"
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options=_extra_options())
            report = decoder_quality_gate(reference, ort_logits_fn(dst, layout), ids, window=512,
                                          max_ppl_ratio=1.05, min_greedy_agreement=0.75)
            print(json.dumps({"variant": label, "excluded_nodes": len(exclude),
                              "ppl_fp32": report["perplexity"]["reference"], "ppl": report["perplexity"]["candidate"],
                              "ratio": report["perplexity"]["ratio"], "greedy": report["greedy"]["agreement"],
                              "exact_prefix": report["greedy"]["exact_prefix"],
                              "window_top1": report["window_top1_agreement"],
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
