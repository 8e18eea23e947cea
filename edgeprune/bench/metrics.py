"""What the benchmark reports about a model: size, FLOPs, latency statistics, quality ratios."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeprune.core.artifacts import is_artifact, read_manifest
from edgeprune.core.onnxio import onnx_file_set
from edgeprune.exporters.sparse import gzip_size_of, weight_stats


def latency_stats(seconds: Sequence[float], batch: int, seq: int) -> dict[str, Any]:
    """Percentiles in milliseconds plus throughput. ``seconds`` holds one entry per timed call."""
    values = np.asarray(seconds, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latencies")
    p50, p90, p99 = (float(np.percentile(values, q)) for q in (50, 90, 99))
    mean = float(values.mean())
    return {
        "n": int(values.size),
        "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "p99_ms": p99 * 1e3,
        "mean_ms": mean * 1e3, "std_ms": float(values.std()) * 1e3, "min_ms": float(values.min()) * 1e3,
        "throughput_seq_s": batch / mean,
        "throughput_tok_s": batch * seq / mean,
    }


def round_medians_spread(per_round: Sequence[Sequence[float]]) -> float | None:
    """Relative spread (max-min)/median of the per-round medians: how stable the median is across rounds."""
    medians = [float(np.median(r)) for r in per_round if len(r)]
    if len(medians) < 2:
        return None
    mid = float(np.median(medians))
    return (max(medians) - min(medians)) / mid if mid > 0 else None


def onnx_counts(path: Path) -> dict[str, int]:
    """Parameters and non-zeros over all initializers (dense and sparse), external data included; the same
    counting as the exporter's manifest (``exporters.sparse.weight_stats``)."""
    import onnx

    stats = weight_stats(onnx.load(str(path)))
    return {"initializer_elements": stats["elements"], "nonzeros": stats["nonzeros"]}


def model_size(model_dir: Path, onnx_path: Path) -> dict[str, Any]:
    """File bytes, gzip bytes, parameters and non-zeros of the ONNX file a runtime loads.

    Prefers the exporter's manifest numbers; computes what it lacks. ``parameters`` is the PyTorch
    parameter count the exporter recorded (the honest "model size"), else the initializer element count:
    read from the export itself, so the report is the same on any machine."""
    onnx_path = Path(onnx_path)
    size: dict[str, Any] = {"file": onnx_path.name}
    manifest = read_manifest(model_dir) if Path(model_dir).is_dir() and is_artifact(model_dir) else {}
    variant = next((v for v in manifest.get("variants", []) if v.get("file") == onnx_path.name), {})
    size["bytes"], size["gzip_bytes"] = variant.get("bytes"), variant.get("gzip_bytes")
    if not size["bytes"] or not size["gzip_bytes"]:  # not in the manifest: read the file and its external data
        files = onnx_file_set(onnx_path)
        size["bytes"] = size["bytes"] or sum(p.stat().st_size for p in files)
        size["gzip_bytes"] = size["gzip_bytes"] or gzip_size_of(files)
    counts = gguf_counts(onnx_path) if onnx_path.suffix == ".gguf" else onnx_counts(onnx_path)
    size["initializer_elements"] = counts["initializer_elements"]
    size["nonzeros"] = variant.get("nonzeros") or counts["nonzeros"]
    size["quantization"] = variant.get("quantization")
    stats = manifest.get("model_stats") or {}
    size["parameters"] = stats.get("parameters") or counts["initializer_elements"]
    size["dense_parameters"] = stats.get("dense_parameters")
    return size


def gguf_counts(path: Path) -> dict[str, int]:
    """Weight elements of a GGUF file (quantized blocks count their logical elements); non-zeros are not
    counted (that would mean dequantizing every tensor) and reported as the element count."""
    import math

    from edgeprune.core.ggufio import read_gguf_metadata

    elements = sum(math.prod(shape) for _, shape, _ in read_gguf_metadata(path, tensors=True)[1])
    return {"initializer_elements": elements, "nonzeros": elements}


def analytic_flops(model_dir: Path, seq_lens: Sequence[int]) -> dict[str, Any] | None:
    """Block FLOPs per sequence (2 per multiply-add; embeddings and LM head excluded) for each seq length,
    from the coefficients the exporter recorded in the export's manifest (torch-free, and the same on every
    machine); None for an export without them (a plain .onnx file, or one made before they were recorded)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir) if model_dir.is_dir() and is_artifact(model_dir) else {}
    flops = (manifest.get("model_stats") or {}).get("flops")
    if not flops:
        return None
    per_seq = {str(s): int(round(flops["linear"] * int(s) + flops["quadratic"] * int(s) ** 2)) for s in seq_lens}
    return {"per_sequence": per_seq, "per_token": {k: v / int(k) for k, v in per_seq.items()},
            "scope": flops.get("scope", "transformer blocks, 2 FLOPs per multiply-add")}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0) or (isinstance(numerator, float) and math.isnan(numerator)):
        return None
    return numerator / denominator


def quality_ratio(task_metric: str, value: float | None, dense: float | None) -> float | None:
    """Candidate quality as a fraction of dense, higher is better for every metric: Spearman directly,
    perplexity inverted (dense ppl / candidate ppl)."""
    if value is None or dense is None:
        return None
    if task_metric == "perplexity":
        return ratio(dense, value)
    return ratio(value, dense)
