"""The settings the project measured best, per model family: what ``edgeprune compress`` uses without a
recipe when calibration data (``--calib``) or fine-tuning data (``--finetune``) is given. Flags given on the
command line still win. The numbers quoted are in docs/quality-structured.md and
docs/quality-sparsity-finetune.md; the shipped recipes hold the same settings."""

from __future__ import annotations

import json
from pathlib import Path

# Structured pruning with calibration data. Encoders = minilm-50-posttraining.yaml (MiniLM 50 % of block
# FLOPs: 85.54 STS-dev vs 78.63 for magnitude/uniform); decoders = smollm2-25-distill.yaml's pruning part.
BEST_STRUCTURED = {
    "encoder": {
        "structured": {"importance": "fisher", "allocation": "joint", "round_to": 4, "seq_len": 128},
        "calibration": {"samples": 2048, "max_length": 128, "batch_size": 32},
        "reconstruct": {"enabled": True, "mode": "scales", "damping": 1.0, "fit_bias": False},
    },
    "decoder": {
        # seq_len 1: block FLOPs proportional to block parameters (decode is weight-bound)
        "structured": {"importance": "fisher", "allocation": "joint", "gqa_mode": "groups", "round_to": 4,
                       "seq_len": 1},
        "calibration": {"samples": 256, "max_length": 128, "batch_size": 8},
        "reconstruct": {"enabled": True, "mode": "scales", "damping": 1.0, "fit_bias": False},
    },
}
# Recovery fine-tuning (--finetune DATA): distillation from the dense model as the recipes do it
# (MiniLM 50 %: 86.66 STS-dev after 1 epoch; SmolLM2 25 %: perplexity 44.76 -> 17.64 after 300 steps).
BEST_FINETUNE = {
    "encoder": {"distill": True, "distill_objective": "cosine", "learning_rate": 1e-4, "batch_size": 32,
                "dropout": False},
    "decoder": {"distill": True, "learning_rate": 1e-4, "batch_size": 4, "temperature": 1.0, "lm_weight": 0.5},
}

HELP = ("Without --recipe, when --calib is given, structured pruning uses the settings measured best for the "
        "model family: Fisher importance, joint head/neuron search under a block-FLOPs budget (--heads/--ffn "
        "alone set the budget to the FLOPs their uniform cut keeps, e.g. 0.5/0.5 -> 50 %), widths rounded to "
        "4, per-unit scale re-fit (damping 1) on 2,048 calibration texts (decoders: 256, whole KV groups, "
        "FLOPs at seq 1); with --finetune: distillation from the dense model at lr 1e-4. Without --calib: "
        "magnitude importance, uniform per-layer cut (data-free; MiniLM 50/50: 78.6 vs 85.5 STS-dev). "
        "Built-in recipes: `edgeprune recipes list`.")

# A combination measured to hurt: warn with the number (MiniLM, Fisher, 50 % FLOPs, docs/quality-structured.md).
FULL_RECONSTRUCT_ENCODER = ("--reconstruct-mode full re-fits whole weights and over-fits sentence embeddings: "
                            "measured on MiniLM at 50 % of block FLOPs, STS-dev 57.52 with full vs 85.05 with "
                            "scales (the default); keep it only if you measured it helps your model")


def model_family(spec: str) -> str | None:
    """``encoder`` or ``decoder`` from the model's config, without loading weights; None when the config
    cannot be read here (loading the model then reports why)."""
    from edgeprune.core.arch import get_adapter
    from edgeprune.core.loading import resolve

    source = resolve(spec)
    if source.kind == "gguf":
        return "decoder"  # GGUF models here are llama-family decoders
    config_file = Path(source.directory) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type")
    else:  # a hub id: its config only (small download, or the HF cache)
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(source.path).model_type
        except Exception:  # offline, unknown id: load_model gives the one-line error
            return None
    return "decoder" if get_adapter(model_type).is_decoder else "encoder"


def merge(base: dict, overrides: dict) -> dict:
    for section, values in overrides.items():
        base[section] = dict(base.get(section) or {}, **values)
    return base
