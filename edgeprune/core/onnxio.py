"""ONNX I/O conventions shared by validation (exporters), the runtimes, eval and bench. Torch-free.

- Naming (optimum's): inputs ``past_key_values.N.key|value``, outputs ``present.N.key|value``; the manifest's
  ``kv_layout`` gives each layer's ``kv_heads`` and ``head_dim`` (pruned layers differ).
- Feeds: random (validation), deterministic (benchmark), from text, and the empty past.
- The one ``onnxruntime.InferenceSession`` construction site (``ort_session``): the exporter's validation
  gates, the onnxruntime runtime (eval, bench, ``edgeprune run``) all open sessions here with the same
  options, so the graph that is validated is the graph that is timed.
- The one timing loop (``timed_calls``), which consumes every output of every timed call.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Token ids below this are usually special tokens; benchmark inputs avoid them.
FIRST_ORDINARY_ID = 5

# --- session options --------------------------------------------------------------------------------------
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
# ORT's warnings (e.g. "removing initializer ...") would drown the one-line report; errors still show.
LOG_SEVERITY_ERROR = 3


def default_session_settings() -> dict:
    """What every session gets unless told otherwise (recorded in benchmark reports)."""
    return {"graph_optimization": DEFAULT_OPTIMIZATION, "inter_op_threads": DEFAULT_INTER_OP_THREADS,
            "execution_provider": "CPUExecutionProvider", "disabled_optimizers": list(DEFAULT_DISABLED_OPTIMIZERS)}


def ort_session(path: str | Path | bytes, threads: int | None = None, inter_op_threads: int | None = None,
                optimization: str = DEFAULT_OPTIMIZATION,
                disabled_optimizers: Sequence[str] = DEFAULT_DISABLED_OPTIMIZERS):
    """An ``onnxruntime.InferenceSession`` on the CPU provider with edgeprune's options; the only place the
    package constructs one. ``path``: a file, or a serialized graph (bytes)."""
    import onnxruntime as ort

    if optimization not in OPT_LEVELS:
        raise EdgePruneError(f"unknown graph optimisation level {optimization!r}; choose from {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.log_severity_level = LOG_SEVERITY_ERROR
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
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        where = "the in-memory graph" if isinstance(path, bytes) else path
        raise EdgePruneError(f"onnxruntime cannot load {where}: {str(exc).splitlines()[0][:300]}") from None


def run_session(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of a raw ORT session by name; feeds the graph does not declare are dropped."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values))


def drop_unused_initializers(graph) -> None:
    """Remove, in place, the initializers of ``graph`` that no node reads and no output names."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# --- files: one protobuf, or a graph plus one external weight file ----------------------------------------
# protobuf refuses to serialise a message over 2 GiB; above this many bytes of weights (64 MiB left for the
# graph itself) a model is saved with its tensors in ``NAME.data`` beside ``NAME`` (ONNX external data).
ONNX_SINGLE_FILE_BYTES = 2**31
EXTERNAL_DATA_ABOVE_BYTES = ONNX_SINGLE_FILE_BYTES - 2**26


def _tensor_nbytes(tensor) -> int:
    import onnx

    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def weight_bytes(model) -> int:
    """Bytes of every initializer (dense, sparse, and Constant-node tensors) at their element type."""
    total = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    total += sum(_tensor_nbytes(s.values) + _tensor_nbytes(s.indices) for s in model.graph.sparse_initializer)
    total += sum(_tensor_nbytes(a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                 if a.name == "value")
    return total


def needs_external_data(model) -> bool:
    return weight_bytes(model) > EXTERNAL_DATA_ABOVE_BYTES


def external_files(path: str | Path) -> list[Path]:
    """The external data files an ONNX file refers to (beside it), without reading them."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer),
               *(a.t for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]
    names = {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}
    return [path.parent / name for name in sorted(names)]


def is_external(path: str | Path) -> bool:
    """Whether the ONNX file at ``path`` keeps its weights in external data files."""
    return bool(external_files(path))


def onnx_file_set(path: str | Path) -> list[Path]:
    """``path`` and, for an ONNX file, its external data files: what has to travel together (a GGUF or other
    file is itself alone)."""
    path = Path(path)
    return [path, *external_files(path)] if path.suffix == ".onnx" else [path]


def save_onnx(model, path: str | Path) -> Path:
    """Save ``model`` to ``path``: one file, or (weights over ``EXTERNAL_DATA_ABOVE_BYTES``) the graph plus
    ``path.name + '.data'`` beside it. External files the old file at ``path`` referred to are removed, and
    ``model`` keeps its tensor data in memory (onnx moves it out while saving; it is read back)."""
    import shutil

    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    stale = set(external_files(path)) if path.is_file() else set()
    if needs_external_data(model):
        location = path.name + ".data"
        (path.parent / location).unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        shutil.copymode(path, path.parent / location)  # onnx creates the data file private (0600)
        load_external_data_for_model(model, str(path.parent))
        stale.discard(path.parent / location)
    else:
        onnx.save_model(model, str(path))
    for old in stale:
        old.unlink(missing_ok=True)
    return path


def move_onnx(src: str | Path, dst: str | Path) -> Path:
    """Move an ONNX file and its external data into ``dst``'s directory; the data files keep their names,
    which the graph refers to."""
    import shutil

    src, dst = Path(src), Path(dst)
    for data in external_files(src):
        target = dst.parent / data.name
        if target.exists() and target != data:
            raise EdgePruneError(f"cannot move {src}: {target} exists")
        shutil.move(str(data), str(target))
    shutil.move(str(src), str(dst))
    return dst


def check_onnx_model(model, path: str | Path) -> None:
    """``onnx.checker`` on a model; a model too large for one protobuf is checked from its file."""
    import onnx

    if needs_external_data(model):
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)


def session_for_model(model, scratch: str | Path, **options):
    """An ORT session on an in-memory graph: from its bytes, or (too large for one protobuf) from a copy
    saved with external data under ``scratch``."""
    if not needs_external_data(model):
        return ort_session(model.SerializeToString(), **options)
    path = Path(scratch) / "session-graph.onnx"
    save_onnx(model, path)
    return ort_session(path, **options)


def opset_of(model) -> int:
    """The default-domain opset of an ``onnx.ModelProto``."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --- naming -----------------------------------------------------------------------------------------------
def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def has_past(names: Iterable[str]) -> bool:
    return any(is_past(n) for n in names)


def past_layer(name: str) -> int | None:
    match = PAST_RE.match(name)
    return int(match.group(1)) if match else None


def present_name(past: str) -> str:
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]


def present_to_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output ``present.N.key`` feeds input ``past_key_values.N.key`` at the next step."""
    return {PAST_PREFIX + name[len(PRESENT_PREFIX):]: value
            for name, value in outputs.items() if name.startswith(PRESENT_PREFIX)}


def empty_past(layout: Sequence[dict[str, int]] | None, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past key/values for every layer of ``kv_layout`` (a prompt's first step)."""
    return {f"{PAST_PREFIX}{i}.{kind}": np.zeros((batch, layer["kv_heads"], 0, layer["head_dim"]), np.float32)
            for i, layer in enumerate(layout or []) for kind in ("key", "value")}


# --- feeds ------------------------------------------------------------------------------------------------
def prompt_feeds(ids: np.ndarray, input_names: Sequence[str], layout: Sequence[dict[str, int]] | None) -> dict[str, np.ndarray]:
    """Feeds for unpadded prompts ``ids`` [B, T] from an empty cache (every position real), only the inputs
    the graph has."""
    ids = np.asarray(ids, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
             **empty_past(layout, ids.shape[0])}
    return {k: v for k, v in feeds.items() if k in input_names}


def random_feeds(input_names: Sequence[str], batch: int, seq: int, past: int, vocab_size: int,
                 layout: list[dict[str, int]] | None, rng: np.random.Generator, type_vocab: int = 2,
                 pad_last: bool = False) -> dict[str, np.ndarray]:
    """Random token ids (and random past key/values) for an exported model's inputs (validation)."""
    feeds: dict[str, np.ndarray] = {}
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if pad_last and batch > 1 and seq > 2:
        mask[-1, past + seq - seq // 3:] = 0  # right padding, as tokenizers do for encoders
    for name in input_names:
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = rng.integers(0, max(type_vocab, 1), size=(batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        elif is_past(name):
            layer = layout[past_layer(name)]
            feeds[name] = rng.standard_normal((batch, layer["kv_heads"], past, layer["head_dim"])).astype(np.float32)
        else:
            raise EdgePruneError(f"exported model has an input this validator does not know: {name}")
    return feeds


def text_feeds(tokenizer, texts: Sequence[str], input_names: Sequence[str], layout: list[dict[str, int]] | None,
               max_length: int = 128) -> dict[str, np.ndarray]:
    """Tokenised texts as feeds (empty past for decoders): calibration and task-level checks."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    batch, seq = encoded["input_ids"].shape
    feeds: dict[str, np.ndarray] = {}
    past = empty_past(layout, batch)
    for name in input_names:
        if name in encoded:
            feeds[name] = encoded[name].astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.clip(np.cumsum(encoded["attention_mask"], axis=1) - 1, 0, None).astype(np.int64)
        elif is_past(name):
            feeds[name] = past[name]
        else:
            raise EdgePruneError(f"cannot build input {name} from text")
    return feeds


def _dim(value, default: int) -> int:
    return value if isinstance(value, int) and value > 0 else default


def build_feeds(inputs, batch: int, seq: int, vocab_size: int, seed: int = 0, past_len: int = 0,
                    past: dict[str, np.ndarray] | None = None,
                    kv_layout: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs from (batch, seq, seed) for ``TensorInfo``-like ``inputs``: every model gets
    identical token ids.

    Decoder sessions get past key/values of length ``past_len`` (zeros, or the given ``past`` arrays,
    keyed by input name) with each layer's own KV-head count: from the export manifest's ``kv_layout``,
    else from the fixed dims of the input metadata."""
    rng = np.random.default_rng(seed)
    high = max(vocab_size, FIRST_ORDINARY_ID + 1)
    ids = rng.integers(min(FIRST_ORDINARY_ID, high - 1), high, size=(batch, seq), dtype=np.int64)
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        dtype = np.dtype(info.dtype)
        name = info.name
        if name == "input_ids":
            feeds[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past_len + seq), dtype=dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(past_len, past_len + seq, dtype=dtype), (batch, 1))
        elif is_past(name):
            if past is not None and name in past:
                feeds[name] = past[name]
            else:
                shape = list(info.shape)
                kv_heads = _dim(shape[1] if len(shape) > 1 else None, 1)
                head_dim = _dim(shape[-1] if shape else None, 1)
                layer = past_layer(name)
                if kv_layout and layer is not None and layer < len(kv_layout):
                    kv_heads, head_dim = int(kv_layout[layer]["kv_heads"]), int(kv_layout[layer]["head_dim"])
                feeds[name] = np.zeros((batch, kv_heads, past_len, head_dim), dtype=dtype)
        elif name == "cache_position":
            feeds[name] = np.arange(past_len, past_len + seq, dtype=dtype)
        else:
            raise EdgePruneError(f"benchmark: don't know how to fill model input {name!r}")
    return feeds


# --- outputs ----------------------------------------------------------------------------------------------
def mean_pool_normalize(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, then L2-normalise: the sentence-transformers recipe for MiniLM."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    summed = (hidden * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return pooled / norms


# --- the greedy loop --------------------------------------------------------------------------------------
def ort_greedy(session, prompt: np.ndarray, steps: int, layout: list[dict[str, int]]) -> list[int]:
    """Greedy decoding of one prompt through an exported decoder (raw ORT session), feeding present -> past
    each step."""
    ids = prompt.reshape(1, -1).astype(np.int64)
    past = empty_past(layout)
    total = 0
    generated: list[int] = []
    for _ in range(steps):
        seq = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total + seq), np.int64),
                 "position_ids": np.arange(total, total + seq, dtype=np.int64).reshape(1, -1), **past}
        result = run_session(session, feeds)
        token = int(result["logits"][0, -1].argmax())
        generated.append(token)
        total += seq
        past = present_to_past(result)
        ids = np.array([[token]], dtype=np.int64)
    return generated


# --- timing -----------------------------------------------------------------------------------------------
def consume(outputs) -> float:
    """Touch every output so a lazy runtime must have produced it; the value goes into a checksum.

    Reading the first and last element of each array is enough to force materialisation without adding
    a full reduction to the timed region."""
    total = 0.0
    values = outputs.values() if isinstance(outputs, dict) else outputs
    for array in values:
        flat = np.asarray(array).reshape(-1)
        if flat.size:
            total += float(flat[0]) + float(flat[-1])
    return total


def timed_calls(run: Callable, feeds: dict, iterations: int, warmup: int = 0) -> tuple[list[float], float]:
    """Call ``run(feeds)`` warmup + iterations times; per-call seconds of the timed ones and a checksum
    of every timed call's outputs (consumed inside the timed region)."""
    for _ in range(warmup):
        consume(run(feeds))
    times, checksum = [], 0.0
    clock = time.perf_counter
    for _ in range(iterations):
        start = clock()
        checksum += consume(run(feeds))
        times.append(clock() - start)
    return times, checksum
