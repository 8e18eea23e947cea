"""ONNX Runtime, in-process, CPU execution provider."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.runtime.base import TensorInfo, prepare_feeds, register_runtime

# ORT type strings ("tensor(int64)") -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
# ORT graph rewrites skipped by default. SkipLayerNormFusion folds residual Add + LayerNormalization into
# SkipLayerNormalization, whose CPU kernel was ~7x slower per node than the pair it replaces in ORT 1.32 on
# AVX-512 (113 vs 16 us at 128x384): INT8 MiniLM ran 12% faster without it, fp32 models unchanged
# (docs/runtime.md). Pass ``disabled_optimizers=()`` for ORT's own defaults.
DEFAULT_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
DEFAULT_OPTIMIZATION = "all"
# One inter-op thread unless asked: parallel branches are rare in transformers and extra threads would
# oversubscribe the cores the benchmark was told to use.
DEFAULT_INTER_OP_THREADS = 1


def default_session_settings() -> dict:
    """What every session gets unless told otherwise (recorded in benchmark reports)."""
    return {"graph_optimization": DEFAULT_OPTIMIZATION, "inter_op_threads": DEFAULT_INTER_OP_THREADS,
            "execution_provider": "CPUExecutionProvider", "disabled_optimizers": list(DEFAULT_DISABLED_OPTIMIZERS)}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in (arg.shape or ()))
    return TensorInfo(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeSession:
    """One ``onnxruntime.InferenceSession``; see ``edgeprune.runtime.base.Session``."""

    def __init__(self, path: Path, threads: int | None, inter_op_threads: int | None = None,
                 optimization: str = DEFAULT_OPTIMIZATION, disabled_optimizers: Sequence[str] = DEFAULT_DISABLED_OPTIMIZERS):
        import onnxruntime as ort

        if optimization not in OPT_LEVELS:
            raise EdgePruneError(f"unknown graph optimisation level {optimization!r}; choose from {', '.join(OPT_LEVELS)}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = int(inter_op_threads or DEFAULT_INTER_OP_THREADS)
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=list(disabled_optimizers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise EdgePruneError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.path = Path(path)
        self.threads = threads
        self.optimization = optimization
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.inputs = [_info(a) for a in self._session.get_inputs()]
        self.outputs = [_info(a) for a in self._session.get_outputs()]

    def _check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return prepare_feeds(self.inputs, feeds)

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        try:
            values = self._session.run(names, self._check(feeds))
        except EdgePruneError:
            raise
        except Exception as exc:
            raise EdgePruneError(f"onnxruntime run failed: {str(exc).splitlines()[0]}") from None
        return dict(zip(names, values))

    def benchmark(self, feeds: dict[str, np.ndarray], iterations: int, warmup: int = 0) -> list[float]:
        feeds = self._check(feeds)
        names = [o.name for o in self.outputs]
        sink = 0.0
        for _ in range(warmup):
            self._session.run(names, feeds)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            values = self._session.run(names, feeds)
            sink += float(values[0].flat[0])  # touch the output so the call cannot be elided
            times.append(time.perf_counter() - start)
        self._sink = sink
        return times

    def close(self) -> None:
        self._session = None


@register_runtime("onnxruntime")
class OnnxRuntime:
    name = "onnxruntime"

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def why_unavailable(self) -> str:
        return "" if self.available() else "onnxruntime is not installed: pip install onnxruntime"

    def load(self, model_path: str, threads: int | None = None, **options) -> OnnxRuntimeSession:
        """``options``: ``inter_op_threads`` (int), ``optimization`` (disable|basic|extended|all),
        ``disabled_optimizers`` (ORT optimizer names; default ``DEFAULT_DISABLED_OPTIMIZERS``)."""
        from edgeprune.core.artifacts import onnx_model_path

        unknown = set(options) - {"inter_op_threads", "optimization", "disabled_optimizers"}
        if unknown:
            raise EdgePruneError(f"unknown onnxruntime options: {', '.join(sorted(unknown))}")
        return OnnxRuntimeSession(onnx_model_path(model_path, "onnxruntime"), threads, **options)
