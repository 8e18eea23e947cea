"""``edgeprune export``. Argument parsing only; heavy imports happen inside the handler."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from edgeprune.runtime.base import target_names

    p = subparsers.add_parser("export", help="export a model or compressed artifact to validated ONNX",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="alias, local HF dir, .gguf, hub id, compressed artifact, export dir or .onnx file")
    p.add_argument("-o", "--output", required=True, help="export directory to create")
    p.add_argument("--config", help="YAML/JSON ExportConfig; flags given on the command line override it")
    p.add_argument("--task", help="feature-extraction, sequence-classification or text-generation (default: by architecture)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("--no-past", action="store_true", help="decoders: export without KV-cache inputs/outputs")
    p.add_argument("--no-simplify", action="store_true",
                   help="keep torch's shape arithmetic (by default it is folded into static reshapes)")
    p.add_argument("--optimize", action="store_true", default=None, help="onnxruntime transformer graph fusion")
    p.add_argument("--quantize", help="ONNX: none, int8-dynamic, int8-static (INT8 activations too) or int4-weight, "
                   "int8-weight (weight-only MatMulNBits) (default none); --target llamacpp: a GGUF type f32, f16, "
                   "bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (default f16)")
    p.add_argument("--block-size", type=int, dest="weight_block_size",
                   help="weight-only: weights per quantization block along K, a power of two >= 16 (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="weight-only: per-block zero points (default symmetric)")
    p.add_argument("--lm-head-bits", type=int, choices=[0, 4, 8],
                   help="weight-only: bits of the LM head (the MatMul writing logits), 0 = keep it fp32 "
                        "(default: 8 for hqq and gptq int4, else the same as the blocks). GGUF: 8 = q8_0 (the "
                        "default under 4/5-bit types), 4 = the blocks' q4 type (by GPTQ with the head's own "
                        "Hessian), 0 = f16")
    p.add_argument("--weight-algorithm", choices=["auto", "rtn", "hqq", "gptq"],
                   help="weight-only: rtn (round to nearest), hqq (fitted scale and zero point per block, no "
                        "calibration data; int4 only) or gptq (error-compensated rounding from --calib text, "
                        "default STS-B train) (default auto: gptq for int4-weight, hqq when no calibration text "
                        "is reachable; rtn for int8-weight). GGUF (--target llamacpp): rtn or gptq onto llama.cpp's "
                        "own block grids (default auto: gptq for q4_0/q4_1/q5_0/q5_1, rtn for q8_0 and when "
                        "streaming or no calibration text is reachable)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                   help="weight-only: MatMulNBits compute precision floor, 4 = int8 activations (default 4)")
    p.add_argument("--fp32-embeddings", action="store_true",
                   help="weight-only: keep the embedding table fp32 (default: GatherBlockQuantized, 8-bit beside an "
                        "8-bit LM head, else 4-bit with the graph converted to opset 21)")
    p.add_argument("--gate-tokens", type=int,
                   help="quantized decoders: tokens the perplexity gate scores (default 4096)")
    p.add_argument("--max-ppl-ratio", type=float,
                   help="quantized decoders: largest perplexity ratio to the fp32 reference accepted (default: 1.05 for ONNX, per type for GGUF: q4_0 1.25)")
    p.add_argument("--min-greedy-agreement", type=float,
                   help="quantized decoders: smallest greedy agreement with the fp32 reference accepted (default: 0.75 for ONNX, per type for GGUF: q4_0 0.6)")
    p.add_argument("--calib", help="calibration text (a built-in key such as stsb:train, STS tsv or text file) for "
                   "int8-static and the quantization checks (default for the check: stsb:train when reachable)")
    p.add_argument("--calib-samples", type=int, help="calibration sentences (default 128)")
    p.add_argument("--gptq-windows", type=int,
                   help="gptq: calibration windows (decoders; sentences for encoders) (default 256)")
    p.add_argument("--gptq-window-tokens", type=int, help="gptq: tokens per calibration window (default 256)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel INT8 weights")
    p.add_argument("--sparse-initializers", choices=["auto", "on", "off"],
                   help="store zero-heavy weights as sparse initializers where that shrinks them (default auto)")
    p.add_argument("--target", choices=target_names(),
                   help="also produce a file this runtime accepts (llamacpp: a GGUF file instead of ONNX)")
    p.add_argument("--atol", type=float, help="numeric gate absolute tolerance (default 1e-3)")
    p.add_argument("--rtol", type=float, help="numeric gate tolerance relative to the output's largest magnitude")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .bin (pickle) weights you trust")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="--target llamacpp: write the GGUF file tensor by tensor from the checkpoint's shards and "
                        "check it against a block-by-block PyTorch reference, never holding the whole model "
                        "(default: when loading it would need over half the available memory)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=run_export)


FLAGS = ("task", "opset", "optimize", "quantize", "calib", "calib_samples", "gptq_windows", "gptq_window_tokens",
         "sparse_initializers", "target",
         "atol", "rtol", "weight_block_size", "weight_algorithm", "lm_head_bits", "accuracy_level", "gate_tokens", "max_ppl_ratio",
         "min_greedy_agreement")


def config_from_args(args):
    from edgeprune.exporters.api import ExportConfig

    base = ExportConfig.from_file(args.config).to_dict() if args.config else ExportConfig().to_dict()
    if args.target == "llamacpp" and args.quantize is None and base.get("quantize") == "none":
        base["quantize"] = "f16"  # GGUF has no "none"; f16 is llama.cpp's unquantized default
    for flag in FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            base[flag] = value
    if args.no_past:
        base["with_past"] = False
    if args.per_tensor:
        base["per_channel"] = False
    if args.no_simplify:
        base["simplify"] = False
    if args.asymmetric:
        base["weight_symmetric"] = False
    if args.fp32_embeddings:
        base["quantize_embeddings"] = False
    return ExportConfig.from_dict(base)


def run_export(args) -> int:
    from edgeprune.core.artifacts import read_manifest
    from edgeprune.core.console import print_json_last
    from edgeprune.exporters.api import export

    config = config_from_args(args)
    out = export(args.model, args.output, config, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                 streaming=args.streaming)
    manifest = read_manifest(out)
    for variant in manifest["variants"]:
        if variant.get("format") == "gguf":
            types = ", ".join(f"{n} {t}" for t, n in variant["tensor_types"].items())
            print(f"{variant['file']}: {variant['bytes'] / 1e6:.2f} MB, {variant['quantization']}, llama.cpp "
                  f"architecture {variant['architecture']}, tensors: {types}")
            continue
        print(f"{variant['file']}: {variant['bytes'] / 1e6:.2f} MB (gzip {variant['gzip_bytes'] / 1e6:.2f} MB), "
              f"{variant['nonzeros']:,} non-zeros, quantization {variant['quantization']}, "
              f"sparse tensors {variant['sparse_tensors']}, IR {variant['ir_version']}, opset {variant['opset']}")
    gates = {k: v for k, v in manifest["validation"].items() if isinstance(v, dict)}
    for label, report in gates.items():
        if "outputs" in report:
            worst = max(e["max_abs"] for e in report["outputs"].values())
            print(f"validation {label}: max abs error {worst:.3g} vs {report['reference']}")
        elif report.get("metric") == "decoder_quality":
            ppl, greedy = report["perplexity"], report["greedy"]
            print(f"validation {label}: perplexity {ppl['candidate']:.4f} vs fp32 {ppl['reference']:.4f} "
                  f"(ratio {ppl['ratio']:.4f}, max {ppl['max_ratio']}), greedy agreement {greedy['agreement']:.3f} "
                  f"(min {greedy['min_agreement']}, exact prefix {greedy['exact_prefix']}/{greedy['new_tokens']})")
        elif "decoder_gate" in report:
            gate = report["decoder_gate"]
            print(f"validation {label} (llama.cpp vs {report['reference']}): perplexity ratio "
                  f"{gate['perplexity']['ratio']:.4f} (max {gate['perplexity']['max_ratio']}), greedy agreement "
                  f"{gate['greedy']['agreement']:.3f} (min {gate['greedy']['min_agreement']}), logits max abs error "
                  f"{report['logits']['max_abs']:.3g}")
        elif "metric" in report:
            print(f"validation {label}: {report['metric']} {report['value']:.4f} (threshold {report['threshold']})")
    if args.json:
        print_json_last({"output": str(out), "files_by_role": manifest["files_by_role"],
                         "variants": manifest["variants"], "validation": manifest["validation"]})
    return 0
