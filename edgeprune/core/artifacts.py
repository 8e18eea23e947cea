"""Artifact directories: atomic creation, manifest with file hashes, parent links and library versions.

Every stage (compress, export, bench) writes one directory. It is built in a temporary sibling and
renamed into place only when complete, so a failed run never leaves a half-written output behind.
Torch-free: the runtime side reads manifests too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
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
from edgeprune.core.errors import EdgePruneError

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


def _is_replaceable(out: Path) -> bool:
    """What ``--overwrite`` may delete: an edgeprune output (it holds a manifest) or an empty directory."""
    return out.is_dir() and not out.is_symlink() and ((out / MANIFEST).is_file() or not any(out.iterdir()))


def _refuse_existing(out: Path, overwrite: bool, when: str = "") -> None:
    if out.is_symlink() and not out.exists():
        raise EdgePruneError(f"output path {out} is a dangling symlink (to {os.readlink(out)}); remove it or choose "
                             "another -o")
    if not out.exists():
        return
    if not overwrite:
        raise EdgePruneError(f"output directory {out} already exists{when} (pass --overwrite to replace it)")
    if not out.is_dir():
        raise EdgePruneError(f"output path {out} exists and is not a directory")
    if not _is_replaceable(out):
        raise EdgePruneError(f"output directory {out} is not an edgeprune output (no {MANIFEST}) and not empty{when}; "
                             "--overwrite only replaces edgeprune outputs: move your files or choose another -o")


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path before any work starts: one that exists (without ``--overwrite``), one that holds
    files edgeprune did not write, the current directory or its parents, or a place that cannot be written."""
    out = Path(out)
    _refuse_existing(out, overwrite)
    target = out.absolute()
    cwd = Path.cwd()
    if out.exists() and (target.resolve() == cwd.resolve() or target.resolve() in cwd.resolve().parents):
        raise EdgePruneError(f"output directory {out} is the current directory (or holds it); run from elsewhere "
                             "or choose another -o")
    ancestor = target.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgePruneError(f"cannot create output {out}: {ancestor} is a file, not a directory")
    try:  # a real write, not os.access: root passes access() on read-only mounts and /proc
        probe = tempfile.mkdtemp(prefix=".edgeprune-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as exc:
        raise EdgePruneError(f"cannot write output {out} in {ancestor}: {exc.strerror or exc}; choose another -o")
    return out


# errno values only a write produces (a disk that cannot take the output), reported as one line naming the
# output path; EACCES is not among them: reading an input can raise it too.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system"}


def write_error(exc: OSError, out: Path) -> EdgePruneError:
    where = tempfile.gettempdir()
    return EdgePruneError(f"cannot write output {out}: {_WRITE_ERRNOS[exc.errno]} (while writing "
                          f"{exc.filename or 'a file'}; outputs are staged beside {out} and scratch goes to {where}, "
                          "set TMPDIR to move it); nothing was written")


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block finishes without error.

    The destination is checked again at rename time: a directory that appeared meanwhile (or changed into
    something that is not an edgeprune output) is never removed."""
    out = check_output_dir(out, overwrite)
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise EdgePruneError(f"cannot create output {out}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact should look like any other directory
    try:
        yield tmp
        _refuse_existing(out, overwrite, when=" (it appeared while this run was working; the result was discarded)")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise write_error(exc, out) from None
        raise
    trash = None
    try:
        if out.exists():
            # Move the old one aside first so a crash between the two renames still leaves one complete copy.
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
        os.replace(tmp, out)
    except OSError as exc:
        if trash is not None and (trash / "old").exists() and not out.exists():
            os.replace(trash / "old", out)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _remove_empty(created)
        raise EdgePruneError(f"cannot move the finished output into place at {out}: {exc.strerror or exc}; "
                             "nothing was written") from None
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            return


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> list[str]:
    """Problems with the files a manifest lists (missing or a SHA-256 that differs); empty: intact."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{directory / MANIFEST}: lists no file hashes"]
    problems = []
    for name, digest in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: SHA-256 differs from the manifest (modified or corrupt)")
    return problems


def check_integrity(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
    """Raise one line naming the first file whose hash does not match (run ``edgeprune verify`` for all)."""
    problems = verify_files(directory, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EdgePruneError(f"{problems[0]}{more}; re-create it, or see `edgeprune verify {directory}`")


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
        if is_artifact(export_dir.parent) and read_manifest(export_dir.parent).get("stage") == "export":
            check_integrity(export_dir.parent)
        return export_dir
    if not export_dir.is_dir():
        raise EdgePruneError(f"exported model not found: {export_dir}")
    if is_artifact(export_dir):
        manifest = read_manifest(export_dir)
        if manifest.get("stage") != "export":
            raise EdgePruneError(f"{export_dir}: a {manifest.get('stage')!r} artifact; export it first "
                                 f"(edgeprune export {export_dir} -o OUT)")
        check_integrity(export_dir, manifest)  # a tampered or truncated file must not run without a word
        roles = manifest.get("files_by_role", {})
        if runtime in roles:
            if not roles[runtime]:
                if runtime == "deepsparse" and manifest.get("with_past"):
                    raise EdgePruneError(f"{export_dir}: a KV-cache decoder has no DeepSparse file (DeepSparse 1.8 "
                                         "compiles one engine per shape): run decoders with --runtime onnxruntime, "
                                         "or re-export with --no-past --target deepsparse")
                raise EdgePruneError(f"{export_dir}: no ONNX file for {runtime} in this export "
                                     f"(re-export with --target {runtime})")
            return export_dir / roles[runtime]
    if (export_dir / DEFAULT_ONNX).is_file():
        return export_dir / DEFAULT_ONNX
    raise EdgePruneError(f"{export_dir}: no {DEFAULT_ONNX} found")
