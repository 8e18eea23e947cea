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

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

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


class Runtime(Protocol):
    name: str

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
