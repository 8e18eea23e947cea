"""Exported tiny models for the runtime tests, and the DeepSparse availability check."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

OPTIMUM_TASKS = {"feature-extraction": "feature-extraction", "sequence-classification": "text-classification",
                 "text-generation": "text-generation-with-past"}


def export_tiny(source: Path, out: Path, task: str) -> Path:
    """Export a tiny HF model dir to an edgeprune-style export directory (model.onnx + manifest).

    Dense tiny models export fine through optimum directly; the manifest carries the keys the runtime reads
    (task, with_past, files_by_role, kv_layout), as edgeprune.exporters writes them.
    """
    from optimum.exporters.onnx import main_export

    from edgeprune.artifacts import write_manifest

    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(source), output=str(out), task=OPTIMUM_TASKS[task], opset=17, do_validation=False,
                    library_name="transformers")
    config = json.loads((out / "config.json").read_text())
    extra = {"task": task, "with_past": task == "text-generation",
             "files_by_role": {"onnxruntime": "model.onnx", "deepsparse": "model.onnx"}}
    if task == "text-generation":
        heads = config.get("num_attention_heads") or config.get("n_head")
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or (config.get("hidden_size") or config.get("n_embd")) // heads
        extra["kv_layout"] = [{"kv_heads": kv, "head_dim": head_dim}] * (config.get("num_hidden_layers")
                                                                          or config.get("n_layer"))
    write_manifest(out, "export", {"task": task}, parent=str(source), **extra)
    return out


@pytest.fixture(scope="session")
def exported(tiny_models, tmp_path_factory):
    """Factory: exported(family, task) -> (tiny HF source dir, export dir), built once per session."""
    cache = {}

    def get(family: str, task: str):
        key = (family, task)
        if key not in cache:
            source = tiny_models(family, task if task == "sequence-classification" else None)
            out = tmp_path_factory.mktemp(f"export-{family}-{task}")
            cache[key] = (source, export_tiny(source, out, task))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def deepsparse_runtime():
    from edgeprune.runtime.base import get_runtime

    runtime = get_runtime("deepsparse", require_available=False)
    if not runtime.available():
        pytest.skip(f"DeepSparse env missing: {runtime.why_unavailable()}")
    return runtime
