"""Sparse initializers: store weights that are mostly zeros as ``GraphProto.sparse_initializer``.

Values plus INT64 linear indices cost (itemsize + 8) bytes per non-zero, so fp32 only breaks even near 67%
sparsity and INT8 near 89%. Tensors are converted one by one, only where that shrinks them. ORT densifies
sparse initializers when it loads the model; they shrink files, not compute. Applied after quantization
(ORT's quantizers refuse models holding sparse initializers).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.onnxio import onnx_file_set, opset_of

MODES = ("auto", "on", "off")
INDEX_BYTES = 8  # INT64 linear indices
# "auto" converts a tensor only when it shrinks by at least this fraction and is big enough to matter.
AUTO_MIN_SAVING = 0.10
AUTO_MIN_ELEMENTS = 1024


def sparse_bytes(nonzeros: int, itemsize: int) -> int:
    return nonzeros * (itemsize + INDEX_BYTES)


def should_sparsify(array: np.ndarray, mode: str) -> bool:
    if mode == "off" or array.size == 0 or array.dtype.kind not in "fiu":
        return False
    dense = array.size * array.itemsize
    sparse = sparse_bytes(int(np.count_nonzero(array)), array.itemsize)
    if mode == "on":
        return sparse < dense
    return array.size >= AUTO_MIN_ELEMENTS and sparse <= (1 - AUTO_MIN_SAVING) * dense


def sparsify(model, mode: str) -> tuple[Any, dict[str, Any]]:
    """Move qualifying initializers to sparse_initializer (in place). Returns the model and a summary."""
    from onnx import helper, numpy_helper

    if mode not in MODES:
        raise EdgePruneError(f"--sparse-initializers must be one of {', '.join(MODES)} (got {mode!r})")
    graph = model.graph
    keep, converted, saved = [], [], 0
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if not should_sparsify(array, mode):
            keep.append(tensor)
            continue
        flat = array.reshape(-1)
        indices = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[indices], tensor.name)
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(indices, f"{tensor.name}_indices"),
                                           list(array.shape))
        graph.sparse_initializer.append(sparse)
        converted.append(tensor.name)
        saved += array.size * array.itemsize - sparse_bytes(indices.size, array.itemsize)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model, {"mode": mode, "tensors": len(converted), "bytes_saved": int(saved)}


def densify(model):
    """Sparse initializers back to dense ones (DeepSparse and ORT's quantizers refuse sparse ones)."""
    from onnx import numpy_helper

    graph = model.graph
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(sparse.dims)
        dense = np.zeros(int(np.prod(dims)) if dims else 1, dtype=values.dtype)
        if indices.ndim == 2:  # COO coordinates (nnz, rank)
            indices = np.ravel_multi_index(indices.T, dims)
        dense[indices] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
    del graph.sparse_initializer[:]
    return model


def weight_stats(model) -> dict[str, int]:
    """Elements and non-zeros over all initializers, dense and sparse."""
    from onnx import numpy_helper

    elements = nonzeros = 0
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        elements += array.size
        nonzeros += int(np.count_nonzero(array))
    for sparse in model.graph.sparse_initializer:
        elements += int(np.prod(sparse.dims)) if len(sparse.dims) else 1
        nonzeros += int(np.count_nonzero(numpy_helper.to_array(sparse.values)))
    return {"elements": elements, "nonzeros": nonzeros}


def gzip_size(path: Path) -> int:
    """gzip size of the file and its external data together."""
    return gzip_size_of(onnx_file_set(path))


def gzip_size_of(files: list[Path]) -> int:
    """gzip size of ``files`` as one stream, read in chunks (a 2 GB graph is not read at once). Level 6 (zlib
    default): a realistic transfer size at a bearable cost for ~100 MB files."""
    compressor, total = zlib.compressobj(6, zlib.DEFLATED, 31), 0  # wbits 31: the gzip container
    for part in files:
        with open(part, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def variant_record(path: Path, model, quantization: str, role: str) -> dict[str, Any]:
    """One manifest "variants" entry."""
    stats = weight_stats(model)
    files = onnx_file_set(path)  # parsed once: the graph and its external data
    return {
        "file": Path(path).name,
        "role": role,
        "sparse_initializers": bool(model.graph.sparse_initializer),
        "sparse_tensors": len(model.graph.sparse_initializer),
        "quantization": quantization,
        "bytes": sum(part.stat().st_size for part in files),
        "gzip_bytes": gzip_size_of(files),
        "nonzeros": stats["nonzeros"],
        "elements": stats["elements"],
        "ir_version": int(model.ir_version),
        "opset": opset_of(model),
        "external_data": [part.name for part in files[1:]],
    }
