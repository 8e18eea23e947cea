"""``edgeprune compress``. Argument parsing only; heavy imports happen inside the handler."""

from __future__ import annotations

import argparse

# CLI flag -> StructuredConfig field. Flags left unset keep the recipe's (or the default) value.
STRUCTURED_FLAGS = {
    "heads": "heads", "ffn": "ffn", "importance": "importance", "allocation": "allocation",
    "round_to": "round_to", "gqa_mode": "gqa_mode", "flops_budget": "flops_budget", "seq_len": "seq_len",
    "rearrange": "rearrange", "cost_model": "cost_model", "decode_speedup": "decode_speedup",
    "prefill_speedup": "prefill_speedup",
}
# Depth-pruning flags -> DepthConfig field (index lists are parsed from "i,j,...").
DEPTH_FLAGS = {
    "layers": "layers", "drop_layers": "drop_layers", "attn_layers": "attn_layers", "drop_attn": "drop_attn",
    "ffn_layers": "ffn_layers", "drop_ffn": "drop_ffn", "depth_importance": "importance",
    "sublayer_importance": "sublayer_importance",
}
# Sparsity and fine-tuning flags -> (recipe section, field).
SPARSITY_FINETUNE_FLAGS = {
    "sparsity": ("sparsity", "fraction"), "pattern": ("sparsity", "pattern"), "scope": ("sparsity", "scope"),
    "steps": ("sparsity", "steps"), "sparsity_importance": ("sparsity", "importance"),
    "finetune_each_step": ("sparsity", "finetune_each_step"), "sparsify_embeddings": ("sparsity", "embeddings"),
    "finetune": ("finetune", "data"), "epochs": ("finetune", "epochs"), "distill": ("finetune", "distill"),
    "lr": ("finetune", "learning_rate"), "max_steps": ("finetune", "max_steps"),
    "batch_size": ("finetune", "batch_size"), "max_length": ("finetune", "max_length"),
    "teacher_tokens": ("finetune", "teacher_tokens"), "lora_rank": ("finetune", "lora_rank"),
    "hidden_weight": ("finetune", "hidden_weight"),
    "calib": ("calibration", "path"), "calib_samples": ("calibration", "samples"),
    "calib_length": ("calibration", "max_length"),
    "reconstruct": ("reconstruct", "enabled"), "reconstruct_mode": ("reconstruct", "mode"),
    "reconstruct_damping": ("reconstruct", "damping"),
}


def register(subparsers) -> None:
    from edgeprune.compress.defaults import HELP

    p = subparsers.add_parser("compress", help="prune (and optionally sparsify/fine-tune) a model into an artifact",
                              description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="alias (minilm, smollm2-135m), local HF dir, .gguf file, hub id or artifact")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument("--recipe", help="a built-in recipe by name (`edgeprune recipes list`, e.g. minilm-50-distill) or a "
                   "YAML/JSON file; flags given on the command line override it")
    p.add_argument("--heads", type=float, help="fraction of attention heads to remove per layer, in [0, 1)")
    p.add_argument("--ffn", type=float, help="fraction of FFN neurons to remove per layer, in [0, 1)")
    p.add_argument("--importance", help="importance criterion: magnitude, fisher, taylor, activation "
                   "(default: fisher with --calib, else magnitude)")
    p.add_argument("--allocation", help="uniform (per layer), global (ranked across layers) or joint (greedy on per-layer Fisher blocks under --flops-budget, or the budget --heads/--ffn imply; default with --calib)")
    p.add_argument("--round-to", type=int, help="keep widths a multiple of N (default: 4 with --calib, else 1)")
    p.add_argument("--gqa-mode", choices=["within", "groups"], help="GQA: prune query heads within groups, or whole KV groups")
    p.add_argument("--flops-budget", type=float, help="keep at most this fraction of dense block FLOPs")
    p.add_argument("--seq-len", type=int, help="sequence length for FLOPs counting")
    p.add_argument("--rearrange", action="store_true", default=None,
                   help="after allocation, re-choose each layer's units by their joint Fisher cost (Kwon et al.)")
    p.add_argument("--cost-model", help="price the joint search on the target runtime: a cost model file from "
                   "`edgeprune cost measure` (llama.cpp); units are ranked by loss per millisecond of decode they "
                   "cost there, until --decode-speedup / --prefill-speedup are predicted (depth pruning of the same "
                   "call included)")
    p.add_argument("--decode-speedup", type=float, help="with --cost-model: predicted decode speedup to reach")
    p.add_argument("--prefill-speedup", type=float, help="with --cost-model: predicted prefill speedup to reach")
    p.add_argument("--layers", type=float, help="depth pruning: fraction of transformer blocks to remove, in [0, 1), "
                   "chosen by --depth-importance on --calib data")
    p.add_argument("--drop-layers", type=index_list, metavar="I,J,...", help="depth pruning: remove these blocks (0-based)")
    p.add_argument("--attn-layers", type=float, help="half-block pruning: fraction of blocks whose attention "
                   "sublayer is removed (chosen by --sublayer-importance)")
    p.add_argument("--drop-attn", type=index_list, metavar="I,J,...", help="remove the attention sublayer of these blocks")
    p.add_argument("--ffn-layers", type=float, help="half-block pruning: fraction of blocks whose FFN sublayer is removed")
    p.add_argument("--drop-ffn", type=index_list, metavar="I,J,...", help="remove the FFN sublayer of these blocks")
    p.add_argument("--depth-importance", choices=["bi", "ppl", "ppl-iterative", "taylor"],
                   help="block criterion: Block Influence (ShortGPT, default), calibration perplexity without "
                   "the block (one-shot or iterative; Shortened LLaMA) or Taylor |g*w|")
    p.add_argument("--sublayer-importance", choices=["bi", "ppl", "ppl-iterative", "taylor"],
                   help="criterion for --attn-layers/--ffn-layers (default: --depth-importance)")
    p.add_argument("--sparsity", type=float, help="fraction of block weights to zero (unstructured, 4x4)")
    p.add_argument("--pattern", help="sparsity pattern: unstructured, N:M (e.g. 2:4; implies the fraction) or 4x4")
    p.add_argument("--scope", choices=["local", "global"], help="sparsity per tensor or one threshold across tensors")
    p.add_argument("--steps", type=int, help="iterative sparsity: reach the target in K pruning steps")
    p.add_argument("--sparsify-embeddings", action="store_true", default=None,
                   help="also sparsify the input embedding table (shrinks sparse-initializer files much more)")
    p.add_argument("--sparsity-importance", choices=["magnitude", "movement"], help="weight scores for sparsity")
    p.add_argument("--finetune-each-step", action="store_true", default=None,
                   help="fine-tune between iterative sparsity steps (needs --finetune)")
    p.add_argument("--finetune", metavar="DATA", help="recovery fine-tuning data: a built-in key (stsb:train, "
                   "wikitext2:valid), STS tsv, text file or datasets name; `none` drops a recipe's fine-tuning")
    p.add_argument("--epochs", type=float, help="fine-tuning epochs")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="distil from the dense model (default: on with --finetune and no recipe)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate")
    p.add_argument("--max-steps", type=int, help="cap on fine-tuning steps")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch size")
    p.add_argument("--max-length", type=int, help="fine-tuning max tokens per sequence")
    p.add_argument("--teacher-tokens", type=int, help="decoders: distil on this many tokens sampled from the dense "
                   "model (cached, seeded); with --finetune teacher the only data, else mixed into DATA")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank on the block matrices (merged "
                   "after training) instead of the full weights; 0 = full fine-tuning")
    p.add_argument("--hidden-weight", type=float, help="distillation: weight of the hidden-state MSE (encoders: "
                   "every layer; decoders: the final hidden state)")
    p.add_argument("--calib", metavar="DATA", help="calibration data: a built-in key (stsb:train; `edgeprune data "
                   "list`), STS tsv, text file, datasets name or data file; turns on the measured-best settings")
    p.add_argument("--calib-samples", type=int, help="calibration texts (or token windows for decoders)")
    p.add_argument("--calib-length", type=int, help="calibration tokens per text (decoders: per window); default 128")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="re-fit kept output projections layer by layer by least squares (needs --calib; default: "
                   "on with --calib and no recipe)")
    p.add_argument("--reconstruct-mode", choices=["full", "scales"],
                   help="re-fit per-unit scales (default; measured best) or whole weights (hurts encoders)")
    p.add_argument("--reconstruct-damping", type=float, help="ridge strength, relative to the mean Gram diagonal "
                   "(default: 1.0 for scales, 0.01 for full)")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="compress block by block with bounded memory (llama, mistral, qwen2; chosen automatically "
                        "when the model would not fit in half the available memory)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="--sequential compute/output dtype (default: the checkpoint's)")
    p.add_argument("--task", help="feature-extraction, sequence-classification or text-generation (default: by architecture)")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .bin (pickle) weights you trust")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=run_compress)

    c = subparsers.add_parser("cost", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="the measured llama.cpp cost model of this host (per block, head, neuron)")
    c.add_argument("action", choices=["measure", "show", "predict"],
                   help="measure: time probe GGUFs cut from --model and cache the fit; show: print the cached "
                   "model (measured when absent); predict: speedups of GGUF files vs --model")
    c.add_argument("files", nargs="*", help="predict: GGUF files (llama or deci)")
    c.add_argument("--model", required=True, help="the dense llama GGUF the probes are cut from (e.g. its q4_0)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--prompt", type=int, default=128, help="prefill length")
    c.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    c.add_argument("--cost-model", help="a cost-model JSON file to use instead of this host's cache")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_cost)


def index_list(text: str) -> list[int]:
    """"3,5,7" -> [3, 5, 7]; range and repetition checks happen against the model (depth.check_depth)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 3,5,7 (got {text!r})") from None


def best_defaults(args) -> dict:
    """Recipe sections for a run without --recipe: the measured-best settings of the model's family when
    --calib (structured pruning) or --finetune is given, else the data-free defaults."""
    from edgeprune.compress.api import CompressConfig
    from edgeprune.compress.defaults import BEST_FINETUNE, BEST_STRUCTURED, merge, model_family

    base = CompressConfig().to_dict()
    structured = any(getattr(args, f, None) for f in ("heads", "ffn", "flops_budget", "cost_model"))
    wants_structured_best = structured and args.calib is not None
    wants_finetune_best = getattr(args, "finetune", None) not in (None, "none")
    if not (wants_structured_best or wants_finetune_best):
        return base
    family = model_family(args.model)
    if family is None:
        return base
    if wants_structured_best:
        merge(base, BEST_STRUCTURED[family])
    if wants_finetune_best:
        merge(base, {"finetune": BEST_FINETUNE[family]})
    return base


def config_from_args(args):
    from edgeprune.compress.api import CompressConfig

    if args.recipe:
        from edgeprune.core.recipe_catalog import resolve_recipe

        base = CompressConfig.from_file(resolve_recipe(args.recipe)).to_dict()
    else:
        base = best_defaults(args)
    for flag, field in STRUCTURED_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base["structured"][field] = value
    for flag, field in DEPTH_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base.setdefault("depth", {})[field] = value
    for flag, (section, field) in SPARSITY_FINETUNE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base[section][field] = None if (section, value) == ("finetune", "none") else value
    for key in ("task", "seed"):
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    structured = base["structured"]
    if (not args.recipe and getattr(args, "allocation", None) is None and structured.get("allocation") == "joint"
            and structured.get("importance") != "fisher"):
        # the default joint search needs Fisher interaction blocks: a criterion the user picked keeps the
        # per-layer cut of --heads/--ffn instead of failing
        structured["allocation"] = "uniform"
    return CompressConfig.from_dict(base)


def warn_known_harmful(model: str, config) -> None:
    """One stderr line for a combination the project measured to hurt (it still ran: the user asked), or a
    note that pruning was data-free."""
    import sys

    from edgeprune.compress.defaults import FULL_RECONSTRUCT_ENCODER, model_family

    rc = config.reconstruct
    if rc.enabled and rc.mode == "full" and config.structured.active and model_family(model) == "encoder":
        print(f"edgeprune: warning: {FULL_RECONSTRUCT_ENCODER}", file=sys.stderr)
    elif config.structured.active and config.structured.importance == "magnitude" and config.calibration.path is None:
        print("edgeprune: note: no --calib, so magnitude importance and a uniform cut (data-free); with --calib "
              "stsb:train (or your own text) the measured-best settings apply (`edgeprune compress --help`)",
              file=sys.stderr)


def run_compress(args) -> int:
    from edgeprune.core.artifacts import read_manifest
    from edgeprune.core.console import print_json_last
    from edgeprune.compress.api import compress

    config = config_from_args(args)
    out = compress(args.model, args.output, config, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                   sequential=args.sequential, dtype=args.dtype)
    warn_known_harmful(args.model, config)  # after the run: a failure stays one error line
    manifest = read_manifest(out)
    summary = {"output": str(out), "parameters": manifest["parameters"], "dense_parameters": manifest["dense_parameters"],
               "timings": manifest["timings"]}
    if "sparsity" in manifest:
        summary["sparsity"] = manifest["sparsity"]["sparsity"]
    if "finetune" in manifest:
        summary["finetune"] = manifest["finetune"]
    if "depth" in manifest:
        summary["depth"] = manifest["depth"]
    print(f"wrote {out}: {manifest['parameters']:,} parameters "
          f"({manifest['parameters'] / manifest['dense_parameters']:.1%} of {manifest['dense_parameters']:,}), "
          f"compress {manifest['timings']['compress_s']:.1f}s")
    if args.json:
        print_json_last(summary)
    return 0


def run_cost(args) -> int:
    import json
    from pathlib import Path

    from edgeprune.compress import cost_model as cm
    from edgeprune.core.errors import EdgePruneError

    source = Path(args.model).expanduser()
    if not source.is_file():
        raise EdgePruneError(f"--model {args.model}: no such GGUF file (the dense llama GGUF, e.g. a q4_0 export)")
    for f in args.files:
        if not Path(f).is_file():
            raise EdgePruneError(f"{f}: no such GGUF file")
    model, path, how = cm.load_or_measure(source, threads=args.threads, prompt=args.prompt,
                                          path=Path(args.cost_model) if args.cost_model else None,
                                          remeasure=args.action == "measure", rounds=args.rounds)
    print(f"cost model ({how}): {path}")
    units = model.per_unit()
    print("| unit | prefill ms | decode ms |\n| --- | --- | --- |")
    for name in cm.FEATURES:
        print(f"| {name} | {units['prefill_ms'][name]:.4f} | {units['decode_ms'][name]:.4f} |")
    print("| probe | layers | prefill ms (fit) | decode ms (fit) |\n| --- | --- | --- | --- |")
    for p in model.probes:
        print(f"| {p['name']} | {p['layers']} | {p['prefill_s'] * 1e3:.1f} ({p['prefill_fit_s'] * 1e3:.1f}) | "
              f"{p['decode_s'] * 1e3:.2f} ({p['decode_fit_s'] * 1e3:.2f}) |")
    err = model.fit_error()
    print(f"largest fit error on the probes: prefill {err['prefill']:.1%}, decode {err['decode']:.1%}; "
          f"load average {model.load_average}")
    predictions = {}
    if args.action == "predict":
        dense = cm.gguf_layers(source)
        for f in args.files:
            predictions[f] = model.speedup(cm.gguf_layers(Path(f)), dense)
            print(f"{f}: predicted prefill {predictions[f]['prefill']:.2f}x, decode {predictions[f]['decode']:.2f}x")
    if args.json:
        from edgeprune.core.console import print_json_last

        print_json_last({"cost_model": str(path), "how": how, "per_unit": units, "predictions": predictions})
    return 0
