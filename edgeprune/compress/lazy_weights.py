"""Checkpoint weights read one tensor at a time, never the whole model: safetensors (single file or a sharded
``model.safetensors.index.json``) through ``safe_open``, and GGUF files dequantized tensor by tensor through
the ``gguf`` package's reader.

GGUF tensors get exactly the layout transformers gives them when it converts a GGUF file to a Hugging Face
model: the same dequantization (``gguf.dequantize``), the same GGUF -> HF name map and the same per-architecture
tensor processor (for ``llama`` it undoes llama.cpp's interleaving of the Q/K rows for rotary embeddings).
Every read is counted in ``loaded`` so callers (and tests) can check that no more than one block was held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple
import torch

from edgeprune.core.errors import EdgePruneError

INDEX_FILE = "model.safetensors.index.json"
DEQUANTIZE_CHUNK_BYTES = 8 * 2**20  # float32 rows dequantized per step (bounds dequantize's temporaries)


class LazyWeights:
    """Base: ``get(name)`` returns one Hugging Face-named tensor in ``dtype`` (or the stored one)."""

    def __init__(self) -> None:
        self.loaded: list[str] = []  # every tensor name read, in order

    def names(self) -> list[str]:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def stored_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def numel(self) -> int:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._read(name)
        self.loaded.append(name)
        return tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor

    def state_for(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (e.g. ``model.layers.3.``), keys relative to it."""
        return {n[len(prefix):]: self.get(n, dtype) for n in self.names() if n.startswith(prefix)}

    def close(self) -> None:
        """Release file handles (called after every block)."""


class SafetensorsWeights(LazyWeights):
    """A Hugging Face directory with ``*.safetensors`` (an index for shards). Missing shards fail up front."""

    def __init__(self, directory: str | Path, prefix: str = "") -> None:
        from safetensors import safe_open

        super().__init__()
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise EdgePruneError(f"{directory}: shard {missing[0]} is named in {INDEX_FILE} but missing "
                                     f"({len(missing)} missing); re-download the checkpoint")
            files = {name: directory / f for name, f in weight_map.items()}
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise EdgePruneError(f"{directory}: no model weights (*.safetensors) found")
            files = {}
            for shard in shards:
                try:
                    with safe_open(str(shard), framework="pt") as handle:
                        files.update({name: shard for name in handle.keys()})
                except Exception as exc:  # safetensors raises its own error type for a broken header
                    raise EdgePruneError(f"{directory}: damaged weights file {shard.name} "
                                         f"({str(exc).splitlines()[0][:200]}); download it again") from None
        # Checkpoints of a bare backbone (LlamaModel) lack the causal-LM prefix ("model."): add it.
        self._files = {(name if name.startswith(prefix) or name.startswith("lm_head") else prefix + name): (f, name)
                       for name, f in files.items()}
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _read(self, name: str) -> torch.Tensor:
        file, stored = self._files[name]
        return self._handle(file).get_tensor(stored)

    def _slices(self):
        for name, (file, stored) in self._files.items():
            yield self._handle(file).get_slice(stored)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a matrix; only their bytes are read (then the shard is unmapped again)."""
        file, stored = self._files[name]
        try:
            return self._handle(file).get_slice(stored)[start:stop]
        finally:
            self.close()

    def lookup(self, name: str, ids) -> dict[int, torch.Tensor]:
        """Rows ``ids`` of a matrix (an embedding table), each read on its own; the shard is opened once."""
        file, stored = self._files[name]
        try:
            piece = self._handle(file).get_slice(stored)
            return {int(i): piece[int(i):int(i) + 1][0] for i in ids}
        finally:
            self.close()

    def shape(self, name: str) -> tuple[int, ...]:
        file, stored = self._files[name]
        return tuple(int(d) for d in self._handle(file).get_slice(stored).get_shape())

    def stored_dtype(self) -> torch.dtype:
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for piece in self._slices():
            if piece.get_dtype() in dtypes:
                return dtypes[piece.get_dtype()]
        return torch.float32

    def numel(self) -> int:
        total = 0
        for piece in self._slices():
            count = 1
            for size in piece.get_shape():
                count *= size
            total += count
        return total

    def close(self) -> None:
        # dropping the handles unmaps the files, so pages read for earlier blocks leave the RSS
        self._handles.clear()


class GGUFWeights(LazyWeights):
    """A GGUF file: only the tensor directory is kept; a tensor's bytes are read and dequantized (to
    float32) when it is asked for."""

    def __init__(self, path: str | Path, skeleton) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        from edgeprune.core.ggufio import read_gguf_metadata

        super().__init__()
        self.path = Path(path)
        # the direct header parse (seconds, a few MB), not gguf.GGUFReader (minutes and ~150 MB of numpy views
        # for a 49k-token vocabulary); the config and tokenizer were parsed once already
        fields, infos = read_gguf_metadata(self.path, tensors=True, offsets=True)
        architecture = fields["general.architecture"][0]
        config = skeleton.config
        # transformers hands its processor the head counts it parsed from the metadata (None when absent,
        # which skips the Q/K permutation); the skeleton's config was parsed from the same fields
        has_kv = f"{architecture}.attention.head_count_kv" in fields
        processor_config = {"num_attention_heads": config.num_attention_heads,
                            "num_key_value_heads": config.num_key_value_heads if has_kv else None}
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=processor_config)
        name_map = get_gguf_hf_weights_map(skeleton)
        self._tensors = {name_map[name]: _tensor_info(name, dims, kind, offset)
                         for name, dims, kind, offset in infos if name in name_map}

    def names(self) -> list[str]:
        return list(self._tensors)

    def _read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        info = self._tensors[name]
        # a plain file read, not the reader's memory map: mapped pages once touched stay resident (and
        # count in RSS) until the whole file is unmapped. Matrices are dequantized a few MB of rows at a
        # time into their float32 result: dequantize's temporaries for a whole 49k-row embedding table
        # would be twice the table
        with open(self.path, "rb") as handle:
            handle.seek(info.offset)
            if len(info.shape) != 2:
                raw = np.frombuffer(handle.read(info.n_bytes), dtype=info.dtype).reshape(info.shape)
                weights = np.array(dequantize(raw, info.kind), dtype=np.float32)
            else:
                weights = np.empty(info.logical_shape, dtype=np.float32)
                rows, row_bytes = info.shape[0], info.shape[1] * info.dtype.itemsize
                step = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * info.logical_shape[1]))
                for start in range(0, rows, step):
                    count = min(step, rows - start)
                    raw = np.frombuffer(handle.read(count * row_bytes), dtype=info.dtype).reshape(count, -1)
                    weights[start:start + count] = dequantize(raw, info.kind)
        weights = self._processor.process(weights=weights, name=info.gguf_name).weights
        return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))

    def stored_dtype(self) -> torch.dtype:
        return torch.float32  # quantized blocks dequantize to float32

    def numel(self) -> int:
        return sum(t.n_elements for t in self._tensors.values())


# numpy item types of unquantized ggml tensors; quantized ones are read as rows of bytes
_PLAIN_TYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16", "I32": "int32",
                "I64": "int64"}


def _tensor_info(name: str, dims: tuple[int, ...], kind: int, offset: int) -> "_TensorInfo":
    """What gguf.GGUFReader would give for this tensor: its bytes' size, numpy dtype and shape."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

    kind = GGMLQuantizationType(kind)
    n_elements = int(np.prod(dims)) if dims else 1
    block_size, type_size = GGML_QUANT_SIZES[kind]
    shape = tuple(int(d) for d in reversed(dims))  # of the stored items (bytes for quantized types)
    if kind.name in _PLAIN_TYPES:
        dtype = np.dtype(_PLAIN_TYPES[kind.name])
    else:
        dtype, shape = np.dtype(np.uint8), tuple(quant_shape_to_byte_shape(shape, kind))
    logical = tuple(int(d) for d in reversed(dims))
    return _TensorInfo(name, kind, int(offset), n_elements * type_size // block_size, dtype, shape, n_elements,
                       logical)


class _TensorInfo(NamedTuple):
    gguf_name: str
    kind: object  # gguf.GGMLQuantizationType
    offset: int
    n_bytes: int
    dtype: object  # numpy dtype of the stored blocks
    shape: tuple  # numpy shape of the stored items
    n_elements: int
    logical_shape: tuple  # numpy shape of the dequantized tensor


def release_memory(collect: bool = True) -> None:
    """Collect garbage (``collect``) and hand freed heap pages back to the OS (glibc), so parsing peaks do not
    add up."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def open_weights(source, skeleton) -> LazyWeights:
    """Lazy weights of a resolved model source (``edgeprune.core.loading.ModelSource``) for a meta ``skeleton``."""
    if source.kind == "gguf":
        return GGUFWeights(source.path, skeleton)
    return SafetensorsWeights(source.path, prefix=skeleton.base_model_prefix + ".")


def checkpoint_numel(source) -> int | None:
    """Parameter count from the checkpoint's headers only (no tensor data read); None when unknown."""
    try:
        if source.kind == "gguf":
            import math

            from edgeprune.core.ggufio import read_gguf_metadata

            return sum(math.prod(dims) for _, dims, _ in read_gguf_metadata(source.path, tensors=True)[1])
        if source.kind in ("local", "artifact"):  # a compressed artifact is a safetensors directory too
            return SafetensorsWeights(source.path).numel()
    except (EdgePruneError, OSError, ValueError):
        return None
    return None
