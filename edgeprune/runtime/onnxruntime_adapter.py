"""ONNX Runtime, in-process, CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.onnxio import DEFAULT_DISABLED_OPTIMIZERS, DEFAULT_OPTIMIZATION, ort_session, timed_calls
from edgeprune.runtime.base import ExportTarget, TensorInfo, prepare_feeds, register_runtime

# ORT type strings ("tensor(int64)") -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in (arg.shape or ()))
    return TensorInfo(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeSession:
    """One ``onnxruntime.InferenceSession``; see ``edgeprune.runtime.base.Session``."""

    def __init__(self, path: Path, threads: int | None, inter_op_threads: int | None = None,
                 optimization: str = DEFAULT_OPTIMIZATION, disabled_optimizers: Sequence[str] = DEFAULT_DISABLED_OPTIMIZERS):
        self._session = ort_session(path, threads, inter_op_threads, optimization, disabled_optimizers)
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
        times, self._sink = timed_calls(lambda f: self._session.run(names, f), feeds, iterations, warmup)
        return times

    def close(self) -> None:
        self._session = None


@register_runtime("onnxruntime")
class OnnxRuntime:
    name = "onnxruntime"
    target = ExportTarget("onnxruntime", display="onnxruntime")

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
