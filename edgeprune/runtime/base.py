"""The Runtime / Session protocol every backend implements, and the registry of backends by name.

Torch-free by design. A Session holds one loaded model; benchmark timing happens inside ``benchmark`` (in
the process that runs the model) so inter-process communication is never part of a measured latency.

Usage (what ``edgeprune.bench`` workers and the pipelines do)::

    session = get_runtime("onnxruntime").load(export_dir, threads=2)   # or "deepsparse"
    outputs = session.run({"input_ids": ids, "attention_mask": mask})  # {output name: np.ndarray}
    seconds = session.benchmark(feeds, iterations=50, warmup=5)        # list of per-call seconds
    session.close()

``load`` accepts an export directory (the runtime picks its file via
``edgeprune.core.artifacts.onnx_model_path(dir, runtime)``) or a .onnx path. Runtime-specific ``options``:
onnxruntime takes ``inter_op_threads``, ``optimization`` (disable|basic|extended|all, default all) and
``disabled_optimizers`` (default: SkipLayerNormFusion, measured slower in ORT 1.32);
deepsparse takes none. Feeds may include inputs the model lacks (ignored) and are cast to the declared
dtypes. Sessions with ``static_shapes = True`` (deepsparse) compile one engine per distinct input shape
on first use, so give ``benchmark`` at least one warm-up call per new shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints for fixed dims, strings (symbolic) or None for dynamic ones
    dtype: str  # numpy dtype name, e.g. "int64", "float32"


class Session(Protocol):
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    threads: int | None

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One inference; returns outputs by name."""

    def benchmark(self, feeds: dict[str, np.ndarray], iterations: int, warmup: int = 0) -> list[float]:
        """Run ``warmup`` untimed then ``iterations`` timed calls; seconds per call, measured in-process.
        Implementations must consume every output so the work cannot be skipped."""

    def close(self) -> None: ...


def _no_problems(config: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class ExportTarget:
    """What ``edgeprune export --target NAME`` must produce for a runtime; the runtime module owns it and the
    exporter only runs these hooks (so adding a runtime never adds a branch to the exporter)."""

    name: str
    file_format: str = "onnx"  # "onnx" (the exporter's ONNX pipeline) or "gguf" (exporters.gguf_api)
    in_process: bool = True  # computes in the calling process: bench times ``session.run`` there itself
    display: str = ""  # the name in messages
    # Decoders with a KV cache change the input shapes every step; a static-shape runtime refuses them.
    kv_cache: bool = True
    max_opset: int | None = None  # the newest ONNX opset it runs (source ONNX files are checked against it)
    max_ir: int | None = None  # the newest ONNX IR version it reads (its dense copy is written at most that)
    # export options the runtime cannot run: ExportConfig -> messages (the first is raised)
    config_problems: Callable[[Any], list[str]] = field(default=_no_problems)
    # onnx.ModelProto -> why the runtime would refuse it; None: runs the onnxruntime file as it is
    ready: Callable[[Any], list[str]] | None = None
    # onnx.ModelProto -> a record; rewrites the selected target's dense copy in place into a form the runtime
    # compiles (the exporter checks the result against its source with onnxruntime)
    rewrite: Callable[[Any], dict] | None = None
    # export-time compile check: (onnx path, feeds) -> {"checked": bool, "reason" | measurements}
    check: Callable[[Path, dict], dict] | None = None
    install_hint: str = ""


class Runtime(Protocol):
    name: str
    target: ExportTarget

    def available(self) -> bool: ...

    def why_unavailable(self) -> str:
        """One line telling the user how to make this runtime available."""

    def load(self, model_path: str, threads: int | None = None, **options) -> Session:
        """Load an export directory (or a .onnx file)."""


def prepare_feeds(inputs: Sequence[TensorInfo], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check every model input is fed; drop extras (e.g. token_type_ids for a model without them) and cast
    to the declared dtypes."""
    by_name = {i.name: i for i in inputs}
    missing = set(by_name) - set(feeds)
    if missing:
        raise EdgePruneError(f"missing model inputs: {', '.join(sorted(missing))} "
                             f"(model takes {', '.join(sorted(by_name))})")
    return {k: np.ascontiguousarray(v, dtype=by_name[k].dtype) for k, v in feeds.items() if k in by_name}


_RUNTIMES: dict[str, Callable[[], Runtime]] = {}


def register_runtime(name: str):
    def decorator(factory):
        _RUNTIMES[name] = factory
        return factory
    return decorator


def runtime_names() -> list[str]:
    _import_builtin()
    return sorted(_RUNTIMES)


def get_runtime(name: str, require_available: bool = True) -> Runtime:
    _import_builtin()
    if name not in _RUNTIMES:
        raise EdgePruneError(f"unknown runtime {name!r}; available: {', '.join(sorted(_RUNTIMES))}")
    runtime = _RUNTIMES[name]()
    if require_available and not runtime.available():
        raise EdgePruneError(f"runtime {name!r} is not available: {runtime.why_unavailable()}")
    return runtime


def export_targets(file_format: str | None = None) -> list[ExportTarget]:
    """Every registered runtime's export target, in registration order (the manifest's role order)."""
    _import_builtin()
    targets = [factory.target for factory in _RUNTIMES.values()]
    return [t for t in targets if file_format is None or t.file_format == file_format]


def target_names() -> list[str]:
    return [t.name for t in export_targets()]


def get_target(name: str) -> ExportTarget:
    for target in export_targets():
        if target.name == name:
            return target
    raise EdgePruneError(f"--target must be one of {', '.join(target_names())} (got {name!r})")


def _import_builtin() -> None:
    # Adapters register on import; each module keeps its own heavy imports lazy.
    import importlib

    for module in ("edgeprune.runtime.onnxruntime_adapter", "edgeprune.runtime.deepsparse_adapter",
                   "edgeprune.runtime.llamacpp_adapter"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
