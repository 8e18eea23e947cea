"""INT8 quantization with onnxruntime: dynamic (weights offline, activations at run time) or static QDQ
(activation ranges calibrated on real text)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from edgeprune.errors import EdgePruneError

MODES = ("none", "int8-dynamic", "int8-static")
# Gather: the embedding tables hold a third or more of a small encoder's weights; INT8 there shrinks the file
# (MiniLM: 47 MB of 90 MB) at no measurable quality cost.
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")
STATIC_OPS = ("MatMul", "Gather")


def _extra_options(**more) -> dict[str, Any]:
    import onnx

    # Pruned graphs leave some tensors without inferred types; ORT 1.32's quantizer then needs a default.
    return {"DefaultTensorType": onnx.TensorProto.FLOAT, **more}


def _quiet():
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> dict[str, Any]:
    """INT8 weights for MatMul/Gemm (per output channel when asked), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    _quiet()
    try:
        ort_quantize_dynamic(str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel,
                             weight_type=QuantType.QInt8, extra_options=_extra_options())
    except Exception as exc:
        raise EdgePruneError(f"dynamic quantization failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return {"method": "int8-dynamic", "per_channel": per_channel, "weight_type": "int8", "ops": list(DYNAMIC_OPS)}


class _FeedReader:
    """onnxruntime CalibrationDataReader over pre-built feed batches."""

    def __init__(self, batches: Iterable[dict]):
        self._batches = list(batches)
        self._iter = iter(self._batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._batches)


def weight_nodes(path: Path, op_types: Iterable[str]) -> list[str]:
    """Nodes of ``op_types`` that read a constant weight (Linear layers, embedding tables)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in constants for i in n.input)]


def quantize_static(src: Path, dst: Path, batches: list[dict], per_channel: bool) -> dict[str, Any]:
    """QDQ INT8 with MinMax activation ranges from calibration batches.

    Only weight MatMuls (and embedding Gathers) are quantized: the activation x activation MatMuls of attention
    (QK^T, PV) lose the most under static ranges (MiniLM: mean cosine 0.88 against fp32 with them, see
    docs/export.md). Activations are asymmetric uint8 (GELU outputs are one-sided), weights symmetric int8.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    _quiet()
    if not batches:
        raise EdgePruneError("int8-static needs calibration data (--calib)")
    reader = type("EdgePruneCalibReader", (_FeedReader, CalibrationDataReader), {})(batches)
    nodes = weight_nodes(src, STATIC_OPS)
    if not nodes:
        raise EdgePruneError("int8-static: no weight MatMul/Gather nodes to quantize")
    try:
        ort_quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OPS),
            nodes_to_quantize=nodes, per_channel=per_channel, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options=_extra_options(ActivationSymmetric=False, WeightSymmetric=True))
    except EdgePruneError:
        raise
    except Exception as exc:
        raise EdgePruneError(f"static quantization failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return {"method": "int8-static", "format": "QDQ", "per_channel": per_channel, "calibration_batches": len(batches),
            "calibration_samples": int(sum(b["input_ids"].shape[0] for b in batches)), "ops": list(STATIC_OPS),
            "quantized_nodes": len(nodes), "activations": "uint8 asymmetric", "weights": "int8 symmetric"}
