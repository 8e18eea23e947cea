"""Exported tiny models for the runtime tests, and the DeepSparse availability check."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest


def export_tiny(source: Path, out: Path, task: str) -> Path:
    """Export a tiny HF model dir with edgeprune's own exporter (validated, manifest with kv_layout)."""
    from edgeprune.exporters.api import ExportConfig, export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(source, out, ExportConfig(task=task), overwrite=True, progress=False)


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
