"""Artifact directories: atomic creation, manifest with file hashes, parent links and library versions.

Every stage (compress, export, bench) writes one directory. It is built in a temporary sibling and
renamed into place only when complete, so a failed run never leaves a half-written output behind.
Torch-free: the runtime side reads manifests too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from edgeprune import __version__
from edgeprune.errors import EdgePruneError

MANIFEST = "manifest.json"

# Libraries whose versions change results; recorded without importing them.
TRACKED_LIBRARIES = (
    "edgeprune", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
    "numpy", "tokenizers", "safetensors", "datasets", "deepsparse",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EdgePruneError(f"{directory}: not an edgeprune artifact (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgePruneError(f"{path}: corrupt manifest ({exc})") from None


def is_artifact(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def parent_reference(parent: str | os.PathLike | None) -> dict[str, Any] | None:
    """How a manifest points at the artifact (or source model) it was made from."""
    if parent is None:
        return None
    ref: dict[str, Any] = {"path": str(Path(parent).resolve()) if Path(parent).exists() else str(parent)}
    manifest = Path(parent) / MANIFEST
    if manifest.is_file():
        ref["manifest_sha256"] = sha256_file(manifest)
        ref["stage"] = json.loads(manifest.read_text()).get("stage")
    return ref


def write_manifest(
    directory: str | os.PathLike,
    stage: str,
    config: dict[str, Any],
    parent: str | os.PathLike | dict | None = None,
    **extra: Any,
) -> dict[str, Any]:
    directory = Path(directory)
    manifest = {
        "stage": stage,
        "edgeprune_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "parent": parent if isinstance(parent, dict) or parent is None else parent_reference(parent),
        **extra,
        "files": file_hashes(directory),
        "versions": library_versions(),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return manifest


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise EdgePruneError(f"output directory {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"output path {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block finishes without error."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact should look like any other directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old one aside first so a crash between the two renames still leaves one complete copy.
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


# --- exported-model layout (written by edgeprune.exporters, read by edgeprune.runtime and bench) --------
# An export directory holds config.json, tokenizer files, one or more ONNX files and a manifest with:
#   "task": "feature-extraction" | "sequence-classification" | "text-generation"
#   "with_past": bool                      decoder inputs/outputs include past key values
#   "files_by_role": {"onnxruntime": "model.onnx", "deepsparse": "model_dense.onnx" | null}
#   "variants": [{"file", "sparse_initializers", "quantization", "bytes", "gzip_bytes", "nonzeros",
#                 "ir_version", "opset"}]
#   "validation": {...measured errors...}
DEFAULT_ONNX = "model.onnx"


def onnx_model_path(export_dir: str | os.PathLike, runtime: str = "onnxruntime") -> Path:
    """The ONNX file of an export directory that suits ``runtime`` (or a plain .onnx path as given)."""
    export_dir = Path(export_dir)
    if export_dir.is_file():
        return export_dir
    if not export_dir.is_dir():
        raise EdgePruneError(f"exported model not found: {export_dir}")
    if is_artifact(export_dir):
        manifest = read_manifest(export_dir)
        if manifest.get("stage") != "export":
            raise EdgePruneError(f"{export_dir}: a {manifest.get('stage')!r} artifact; export it first "
                                 f"(edgeprune export {export_dir} -o OUT)")
        roles = manifest.get("files_by_role", {})
        if runtime in roles:
            if not roles[runtime]:
                raise EdgePruneError(f"{export_dir}: no ONNX file for {runtime} in this export "
                                     f"(re-export with --target {runtime})")
            return export_dir / roles[runtime]
    if (export_dir / DEFAULT_ONNX).is_file():
        return export_dir / DEFAULT_ONNX
    raise EdgePruneError(f"{export_dir}: no {DEFAULT_ONNX} found")
