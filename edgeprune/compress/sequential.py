"""Sequential (block-by-block) structured compression with bounded memory, for the Llama family
(``llama``, ``mistral``, ``qwen2``).

The model skeleton lives on the meta device; weights are read lazily one tensor at a time
(:mod:`edgeprune.compress.lazy_weights`). The calibration tokens go through the embeddings once; then

* pass 1 (scores): for each block, load it, run the cached inputs through it with hooks that collect the
  statistics its criterion needs (FLAP fluctuation moments; none for magnitude), score its heads / KV groups
  and FFN neurons, keep its outputs as the next block's inputs, free it; for the gradient criteria (fisher,
  taylor) the whole model's mask gradients instead, a forward and a backward sweep over the blocks with the
  block inputs on disk (:mod:`edgeprune.compress.sequential_fisher`);
* allocation over all blocks at once (uniform, global, a FLOPs budget or the joint search on the Fisher
  blocks: the same allocators as in memory);
* pass 2 (write): for each block, load it, slice it to the plan (whole KV groups or query heads within
  groups, FFN neurons), optionally re-fit its output projections by least squares from the *pruned*
  model's inputs to the dense block's outputs (what ``--reconstruct`` does in memory), run the cached
  inputs through the pruned block, write its tensors into the output shards, free it.

At most one decoder block is materialised at a time (plus, during calibration and at the very end, the
embedding table).
Movement (which fine-tunes the whole model) and --rearrange are refused; sparsity and fine-tuning run in
memory on the artifact.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from edgeprune.core.errors import EdgePruneError

FAMILIES = ("llama", "mistral", "qwen2")
# forward-only / weight-only criteria that score one block at a time, and the whole model's mask gradients
# computed block by block (sequential_fisher: a forward sweep, then a backward sweep from the LM head)
IMPORTANCE = ("flap", "magnitude", "fisher", "taylor")
GRADIENT_IMPORTANCE = ("fisher", "taylor")
ALLOCATIONS = ("uniform", "global", "flops_budget", "joint")  # joint: on the fisher's blocks (rows on disk)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The in-memory path peaked at 2.4x the fp32 weight bytes (SmolLM2-135M: 1.29 GB for 538 MB); it is chosen
# only while that fits in this fraction of the available memory.
IN_MEMORY_PEAK_RATIO = 2.4
MEMORY_FRACTION = 0.5
SHARD_BYTES = 100 * 2**20  # tensors buffered before a shard is written (bounds the writer's memory)
LAYER_PREFIX = "model.layers."


def check_supported(config, model_type: str | None = None) -> None:
    """One line naming what --sequential cannot do and the alternatives; nothing is loaded before it."""
    s = config.structured
    if model_type is not None and model_type not in FAMILIES:
        raise EdgePruneError(f"--sequential supports the Llama family ({', '.join(FAMILIES)}), not "
                             f"{model_type!r}; drop --sequential to compress it in memory")
    if not s.active:
        raise EdgePruneError("--sequential prunes heads/FFN neurons: pass --heads/--ffn or --flops-budget")
    if s.importance not in IMPORTANCE:
        raise EdgePruneError(f"--sequential: importance {s.importance!r} cannot be computed block by block; "
                             f"use one that can ({', '.join(IMPORTANCE)}) or drop --sequential")
    if s.rearrange or s.allocation not in ALLOCATIONS:
        what = "--rearrange" if s.rearrange else f"allocation {s.allocation!r}"
        raise EdgePruneError(f"--sequential: {what} needs the whole model at once; use --allocation "
                             f"{' | '.join(ALLOCATIONS[:2])} (with --flops-budget for a global budget) or joint "
                             "(with --importance fisher), or drop --sequential")
    if s.allocation == "joint" and s.importance != "fisher":
        raise EdgePruneError(f"--sequential: allocation 'joint' needs the Fisher interaction blocks; use "
                             f"--importance fisher, not {s.importance!r}")
    if config.sparsity.active or config.finetune.enabled:
        raise EdgePruneError("--sequential does structured pruning only; run sparsity / fine-tuning on its "
                             "artifact afterwards (edgeprune compress OUT ...) or drop --sequential")


def native_bf16() -> bool:
    """True where this CPU has bf16 matrix instructions. Without them torch emulates bf16 matmuls: measured
    0.3 vs 3.7 GFLOP/s for float32 on this project's 2-core AMD EPYC (AVX2 only), a 12x slowdown."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_dtype(requested: str | None, stored: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype): the output keeps ``--dtype`` (default: the checkpoint's bf16 or fp32);
    bf16 is also computed in bf16 only where the CPU has native bf16 matmuls, else in float32 (a block at a
    time, so the float32 copy is one block's worth)."""
    if requested is not None and requested not in DTYPES:
        raise EdgePruneError(f"--dtype must be one of {', '.join(DTYPES)} (got {requested!r})")
    output = DTYPES[requested] if requested else (stored if stored in (torch.bfloat16, torch.float32) else torch.float32)
    if output == torch.bfloat16 and not native_bf16():
        return torch.float32, output
    return output, output


def exceeds_memory(source) -> tuple[float, float] | None:
    """(bytes the in-memory path needs, bytes available) when it would not fit in MEMORY_FRACTION of the
    available memory, else None (also when the checkpoint's size cannot be read from its headers)."""
    import psutil

    from edgeprune.compress.lazy_weights import checkpoint_numel

    numel = checkpoint_numel(source)
    if numel is None:
        return None
    need, available = numel * 4 * IN_MEMORY_PEAK_RATIO, psutil.virtual_memory().available
    return (need, available) if need > MEMORY_FRACTION * available else None


def should_run_sequential(model, config) -> bool:
    """True (and one line on stderr) when the in-memory path would not fit in MEMORY_FRACTION of the
    available memory and the model and recipe can be compressed block by block."""
    from edgeprune.core.loading import resolve

    try:
        source = resolve(model)
    except EdgePruneError:
        return False  # the in-memory path reports it
    if source.kind not in ("local", "gguf"):
        return False
    too_big = exceeds_memory(source)
    if too_big is None:
        return False
    need, available = too_big
    try:
        check_supported(config, _read_config(source).model_type)
    except EdgePruneError as exc:
        print(f"edgeprune: the in-memory path needs ~{need / 1e9:.1f} GB, more than {MEMORY_FRACTION:.0%} of "
              f"the {available / 1e9:.1f} GB available, but {exc}", file=sys.stderr)
        return False
    print(f"edgeprune: the in-memory path needs ~{need / 1e9:.1f} GB, more than {MEMORY_FRACTION:.0%} of the "
          f"{available / 1e9:.1f} GB available: compressing block by block (--sequential)", file=sys.stderr)
    return True


def _read_config(source, gguf_parsed: dict | None = None):
    """The checkpoint's config. For a GGUF, from ``gguf_parsed`` (``_parse_gguf``) when given: transformers'
    own AutoConfig / AutoTokenizer each parse the whole GGUF metadata again (minutes and ~150 MB each)."""
    import transformers

    try:
        if source.kind == "gguf":
            parsed = gguf_parsed if gguf_parsed is not None else _parse_gguf(source)
            config = transformers.AutoConfig.for_model(**parsed["config"])
            config._name_or_path = str(source.directory)  # as AutoConfig.from_pretrained records it
            return config
        return transformers.AutoConfig.from_pretrained(source.directory, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise EdgePruneError(f"{source.path}: cannot read model config ({str(exc).splitlines()[0]})") from None


def _parse_gguf(source) -> dict:
    """One parse of a GGUF file's metadata (config, tokenizer) with transformers' own parser."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(source.path, return_tensors=False)
    except (OSError, ValueError) as exc:
        raise EdgePruneError(f"{source.path}: cannot read the GGUF metadata ({str(exc).splitlines()[0]})") from None


def _load_tokenizer(source, hf_config, gguf_parsed: dict | None):
    """What ``AutoTokenizer.from_pretrained`` gives (tests compare them), built for a GGUF from the metadata
    parsed once for the config."""
    import transformers

    if source.kind != "gguf":
        return transformers.AutoTokenizer.from_pretrained(source.directory)
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    backend, extra = convert_gguf_tokenizer(gguf_parsed["config"]["model_type"], gguf_parsed["tokenizer"])
    classes = TOKENIZER_MAPPING[type(hf_config)] if type(hf_config) in TOKENIZER_MAPPING else (None, None)
    cls = classes[1] or transformers.PreTrainedTokenizerFast
    return cls(tokenizer_object=backend, name_or_path=str(source.directory),
               **gguf_parsed["tokenizer_config"], **extra)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_COPY_CHUNK = 1 << 20


def _write_bytes(handle, data) -> None:
    """Every byte the writer puts on disk goes through here (tests make it fail like a full disk)."""
    handle.write(data)


class ShardWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of about ``shard_bytes`` each, plus
    the index. Each tensor's bytes go to disk when it is added (into the shard's data file), so the writer
    holds no tensor: buffering a shard's tensors for ``safetensors.save_file`` held up to ``shard_bytes``
    (100 MiB) of a small model's pruned blocks in memory. A shard is the safetensors header followed by that
    data (copied in 1 MiB chunks). A failed write (disk full) raises one EdgePruneError line; the caller's
    staging dir goes."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
        self.directory, self.shard_bytes, self.dtype = Path(directory), shard_bytes, dtype  # dtype: of floats written
        self.pending: dict[str, dict] = {}  # name -> safetensors header entry of the open shard
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.numel = 0
        self.total_bytes = 0
        self._data = None  # the open shard's data file

    def _fail(self, path: Path, exc: OSError):
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return EdgePruneError(f"cannot write {path.name} into {self.directory.parent}: {reason}; free space "
                              "there or choose another -o (nothing was written)")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        tensor = tensor.contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise EdgePruneError(f"{name}: cannot write a {tensor.dtype} tensor into safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        data_path = self.directory / f"part-{len(self.parts):05d}.data"
        try:
            if self._data is None:
                self._data = open(data_path, "wb")
            if nbytes:
                _write_bytes(self._data, tensor.reshape(-1).view(torch.uint8).numpy())
        except OSError as exc:
            raise self._fail(data_path, exc) from None
        self.pending[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.pending_bytes, self.pending_bytes + nbytes]}
        self.pending_bytes += nbytes
        self.numel += tensor.numel()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"part-{len(self.parts):05d}.safetensors"
        data_path = Path(self._data.name)
        try:
            self._data.close()
            self._data = None
            header = json.dumps({"__metadata__": {"format": "pt"}, **self.pending}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            with open(path, "wb") as shard, open(data_path, "rb") as data:
                _write_bytes(shard, len(header).to_bytes(8, "little") + header)
                while chunk := data.read(_COPY_CHUNK):
                    _write_bytes(shard, chunk)
        except OSError as exc:
            raise self._fail(path, exc) from None
        data_path.unlink()
        self.parts.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        for k, (path, names) in enumerate(self.parts, 1):
            final = f"model-{k:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(path, self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class BlockLoader:
    """Materialises one decoder block of a meta skeleton from lazy weights, and frees it again."""

    def __init__(self, skeleton, adapter, weights, dtype: torch.dtype, collect_garbage: bool = True) -> None:
        self.skeleton, self.adapter, self.weights, self.dtype = skeleton, adapter, weights, dtype
        self.collect_garbage = collect_garbage  # a block's tensors are freed by reference counting already
        self.resident: set[int] = set()  # blocks currently materialised (tests check it never exceeds one)
        self.max_resident = 0

    def load(self, index: int):
        layer = self.adapter.layers(self.skeleton)[index]
        state = self.weights.state_for(f"{LAYER_PREFIX}{index}.", self.dtype)
        layer.load_state_dict(state, strict=True, assign=True)
        layer.requires_grad_(False)
        self.weights.close()
        self.resident.add(index)
        self.max_resident = max(self.max_resident, len(self.resident))
        return layer

    def free(self, index: int) -> None:
        from edgeprune.compress.lazy_weights import release_memory

        self.adapter.layers(self.skeleton)[index].to("meta")
        self.resident.discard(index)
        release_memory(collect=self.collect_garbage)


HEAD_CHUNK_ROWS = 8192  # vocabulary rows of the LM head multiplied at a time (bounds its float32 copy)


class BlockwiseLogits:
    """``fn(ids [1, T]) -> float32 logits [1, T, V]`` of a safetensors checkpoint or compressed artifact on disk,
    computed in float32 with one decoder block resident at a time (the rest of the model on the meta device).

    The streaming GGUF export's reference: it gives the in-memory model's logits (tested) without ever holding
    the model. Every call reads every block again (from the page cache after the first), so it suits the few
    dozen calls of an export gate, not generation."""

    def __init__(self, directory: str | Path) -> None:
        import transformers
        from accelerate import init_empty_weights

        from edgeprune.compress.lazy_weights import SafetensorsWeights
        from edgeprune.core.arch import get_adapter
        from edgeprune.core.loading import TASK_CLASSES

        self.config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
        if self.config.model_type not in FAMILIES:
            raise EdgePruneError(f"block-by-block inference supports the Llama family ({', '.join(FAMILIES)}), "
                                 f"not {self.config.model_type!r}")
        self.adapter = get_adapter(self.config)
        with init_empty_weights():
            self.skeleton = getattr(transformers, TASK_CLASSES["text-generation"]).from_config(self.config)
        self.adapter.resize_to(self.skeleton, self.adapter.shapes(self.config))  # meta tensors: shapes only
        self.skeleton.eval()
        self.weights = SafetensorsWeights(directory, prefix=self.skeleton.base_model_prefix + ".")
        # no garbage collection per block: a full collection costs ~0.3-0.9 s, and the gate reads every
        # block ~36 times (it was most of a tiny model's streamed export)
        self.loader = BlockLoader(self.skeleton, self.adapter, self.weights, torch.float32, collect_garbage=False)
        tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in self.weights
        self.head = "model.embed_tokens.weight" if tied else "lm_head.weight"

    @torch.no_grad()
    def __call__(self, ids) -> "np.ndarray":
        import numpy as np

        from edgeprune.compress.reconstruct import _run_layer, _with_hidden, capture_layer_inputs

        # only the looked-up rows, in float32 (exact from bf16/f16), not the table: the model is given its input
        # embeddings, which is the same computation as given the ids
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.weights.lookup("model.embed_tokens.weight", np.unique(ids))
        embeds = torch.stack([rows[int(i)] for i in ids.reshape(-1)]).float().reshape(*ids.shape, -1)
        (call,) = capture_layer_inputs(self.skeleton, self.adapter, [{"inputs_embeds": embeds}])
        for index in range(len(self.adapter.layers(self.skeleton))):
            (hidden,) = _run_layer(self.loader.load(index), [call])
            call = _with_hidden(call, hidden)
            self.loader.free(index)
        hidden = call[0][0] if call[0] else call[1]["hidden_states"]
        norm = self.skeleton.model.norm
        _set_module_tensor(norm, "weight", self.weights.get("model.norm.weight", torch.float32))
        hidden = norm(hidden)
        norm.to("meta")
        vocab = self.weights.shape(self.head)[0]
        logits = torch.empty(*hidden.shape[:-1], vocab, dtype=torch.float32)
        for start in range(0, vocab, HEAD_CHUNK_ROWS):  # the LM head read and widened a chunk of rows at a time
            rows = self.weights.rows(self.head, start, start + HEAD_CHUNK_ROWS).float()
            logits[..., start:start + HEAD_CHUNK_ROWS] = hidden @ rows.T
        self.weights.close()
        return logits.numpy()

    def tensors(self):
        """``(read(hf_name) -> float32 numpy, {hf_name: shape})`` straight from the shards, one tensor at a time
        (what ``ggufio.export_tensors`` streams); an LM head tied to the embeddings is not listed."""
        shapes = {name: self.weights.shape(name) for name in self.weights.names()}
        if self.head != "lm_head.weight":
            shapes.pop("lm_head.weight", None)
        self.weights.close()

        def read(name: str):
            tensor = self.weights.get(name, torch.float32)
            self.weights.close()  # unmap the shard: pages read for earlier tensors leave the RSS
            return tensor.numpy()

        return read, shapes


def _set_module_tensor(module, name: str, tensor: torch.Tensor) -> None:
    setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))


@torch.no_grad()
def _capture_inputs(skeleton, adapter, weights, calib, dtype):
    """The first block's inputs for every calibration batch: the embeddings are materialised for this
    only, the rest of the skeleton stays on the meta device."""
    from edgeprune.compress.reconstruct import capture_layer_inputs

    embed = skeleton.get_input_embeddings()
    _set_module_tensor(embed, "weight", weights.get("model.embed_tokens.weight", dtype))
    try:
        return capture_layer_inputs(skeleton, adapter, calib)
    finally:
        embed.to("meta")
        weights.close()


@torch.no_grad()
def _score_pass(loader, skeleton, adapter, calib, inputs, importance: str, progress: bool):
    """Pass 1: per-block scores from the dense stream (the dense model's own block inputs)."""
    from tqdm.auto import tqdm

    from edgeprune.compress.flap import layer_scores, moment_hooks
    from edgeprune.compress.importance import _kv_scores, magnitude_layer
    from edgeprune.compress.reconstruct import _run_layer, _with_hidden

    shapes = adapter.dense_shapes(skeleton.config)
    head_dim = adapter.head_dim(skeleton.config)
    heads, kv_heads, neurons = [], [], []
    for index in tqdm(range(len(shapes)), desc="sequential: score", disable=not progress, leave=False):
        layer = loader.load(index)
        if importance == "magnitude":
            h, kv, n = magnitude_layer(skeleton, adapter, index)
        else:
            consumers = adapter.unit_consumers(skeleton, index)
            masks: dict = {}
            handles, moments = moment_hooks(consumers, masks)
            last = index + 1 == len(shapes)
            try:
                for i, (batch, call) in enumerate(zip(calib, inputs)):
                    masks["mask"] = batch.get("attention_mask")
                    (out,) = _run_layer(layer, [call])
                    if not last:  # the next block's input replaces this one in place: one stream held
                        inputs[i] = _with_hidden(call, out)
                    del out
            finally:
                for handle in handles:
                    handle.remove()
            h, n = layer_scores(consumers, moments, head_dim)
            kv = _kv_scores(adapter, shapes[index], h)
        loader.free(index)
        heads.append(h)
        kv_heads.append(kv)
        neurons.append(n)
    return heads, kv_heads, neurons


@torch.no_grad()
def _write_pass(loader, skeleton, adapter, plan, calib, inputs, writer, reconstruct_cfg, progress: bool):
    """Pass 2: prune (and re-fit) every block and write it. Returns the per-block reconstruction errors.

    With a re-fit, the dense block runs on the dense stream *before* it is pruned (targets, the next dense
    input, and the pruned stream's attention-consumer inputs, sliced to the kept heads: heads are independent
    up to the output projection); it is pruned in place, then fitted (``reconstruct.refit_block``). Both
    streams are updated batch by batch in place, so each is held once."""
    from tqdm.auto import tqdm

    from edgeprune.compress.reconstruct import _consumer_input, refit_block
    from edgeprune.core.arch.base import kept_rows

    shapes = adapter.dense_shapes(skeleton.config)
    head_dim = adapter.head_dim(skeleton.config)
    dense_inputs = list(inputs) if reconstruct_cfg is not None else None
    report = []
    for index in tqdm(range(len(shapes)), desc="sequential: prune + write", disable=not progress, leave=False):
        layer = loader.load(index)
        layer_plan = plan.layers[index]
        if reconstruct_cfg is not None:
            rc = reconstruct_cfg
            consumers = adapter.unit_consumers(skeleton, index)
            rows = kept_rows(consumers[0], layer_plan, shapes[index], head_dim)

            def attention_input(i, call, layer=layer, module=consumers[0].module, rows=rows):
                return _consumer_input(layer, module, call).index_select(-1, rows)

            def pruned(index=index, layer=layer, layer_plan=layer_plan):
                adapter.prune_layer(skeleton, index, layer_plan, shapes[index])
                return layer, adapter.unit_consumers(skeleton, index)

            entry = refit_block(layer, consumers, dense_inputs, inputs, calib, attention_input, pruned, rc.ridge,
                                rc.mode, rc.fit_bias, head_dim, advance=index + 1 < len(shapes))
            del consumers
            report.append(dict(layer=index, **entry))
        else:
            adapter.prune_layer(skeleton, index, layer_plan, shapes[index])
        for name, tensor in layer.state_dict().items():
            writer.add(f"{LAYER_PREFIX}{index}.{name}", tensor)
        loader.free(index)
    return report


def compress_sequential(model, out, config, overwrite: bool = False, dtype: str | None = None,
                        progress: bool = True) -> Path:
    """Compress ``model`` block by block into the artifact ``out`` (same format as the in-memory path)."""
    import transformers
    from accelerate import init_empty_weights

    from edgeprune.core.artifacts import check_output_dir, staged_output, write_manifest
    from edgeprune.core.arch import get_adapter
    from edgeprune.compress.api import needs_calibration
    from edgeprune.core.model_artifact import PLAN_FILE, RECIPE_FILE
    from edgeprune.compress.calibration import load_calibration, load_texts
    from edgeprune.compress.importance import Scores
    from edgeprune.compress.lazy_weights import open_weights, release_memory
    from edgeprune.compress.plan import (ALLOCATIONS_NEEDING_INTERACTIONS, budget_for_fractions, effective_allocation,
                                         get_allocation)
    from edgeprune.core.anatomy import record_shapes
    from edgeprune.core.loading import TASK_CLASSES, prepare_tokenizer, resolve

    out = Path(out)
    check_output_dir(out, overwrite)
    check_supported(config)
    source = resolve(model)
    if source.kind not in ("local", "gguf"):
        raise EdgePruneError(f"--sequential reads a local checkpoint (a Hugging Face directory with safetensors "
                             f"or a .gguf file), not a {source.kind} source: {source.path}")
    if Path(source.path).resolve() == out.resolve():
        raise EdgePruneError("the output directory must differ from the model directory")
    gguf_parsed = _parse_gguf(source) if source.kind == "gguf" else None  # the only parse of its metadata
    hf_config = _read_config(source, gguf_parsed)
    release_memory()  # parsing GGUF metadata leaves ~150 MB of garbage behind
    check_supported(config, hf_config.model_type)
    adapter = get_adapter(hf_config)
    calibrated = needs_calibration(config)
    if calibrated:
        load_texts(config.calibration.path)  # a bad --calib fails now, before any weight is read
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    task = "text-generation"
    model_cls = getattr(transformers, TASK_CLASSES[task])
    with init_empty_weights():  # parameters on the meta device; the rotary buffers stay real (float32)
        skeleton = model_cls.from_config(hf_config)
    weights = open_weights(source, skeleton)
    run_dtype, out_dtype = compute_dtype(dtype, weights.stored_dtype())
    if run_dtype != torch.float32:
        with init_empty_weights():
            skeleton = model_cls.from_config(hf_config, dtype=run_dtype)
    skeleton.eval()
    tokenizer = _load_tokenizer(source, hf_config, gguf_parsed)
    del gguf_parsed
    prepare_tokenizer(tokenizer)
    release_memory()
    dense_parameters = weights.numel()
    loader = BlockLoader(skeleton, adapter, weights, run_dtype)
    s = config.structured
    calib = load_calibration(SimpleNamespace(tokenizer=tokenizer, adapter=adapter), config.calibration,
                             seed=config.seed) if calibrated else []
    timings = {"load_s": round(time.perf_counter() - started, 3)}
    step = time.perf_counter()
    score_inputs = s.importance != "magnitude"  # magnitude scores need no activations
    inputs = _capture_inputs(skeleton, adapter, weights, calib, run_dtype) if score_inputs else []
    allocation = effective_allocation(s)
    scratch = None
    if s.importance in GRADIENT_IMPORTANCE:
        from edgeprune.compress.sequential_fisher import scratch_directory, sequential_scores

        scratch = scratch_directory(out)  # the block inputs, then the FFN Fisher blocks (joint) until allocated
        scores = sequential_scores(loader, skeleton, adapter, weights, calib, inputs, run_dtype, s.importance,
                                   allocation in ALLOCATIONS_NEEDING_INTERACTIONS, Path(scratch.name),
                                   config.seed, progress)
    else:
        heads, kv_heads, neurons = _score_pass(loader, skeleton, adapter, calib, inputs, s.importance, progress)
        scores = Scores(heads, kv_heads, neurons, comparable=False)
    del inputs
    release_memory()
    timings["score_pass_s"] = round(time.perf_counter() - step, 3)
    if s.flops_budget is None and allocation in ALLOCATIONS_NEEDING_INTERACTIONS:
        s = s.replace(flops_budget=budget_for_fractions(adapter.dense_shapes(hf_config), s, adapter, hf_config))
    plan = get_allocation(allocation)(scores, adapter.dense_shapes(hf_config), s, adapter, hf_config)
    del scores
    if scratch is not None:
        scratch.cleanup()
    plan.meta.update({"importance": s.importance, "allocation": allocation, "gqa_mode": s.gqa_mode,
                      "sequential": True})
    reconstruct_cfg = config.reconstruct if config.reconstruct.enabled else None
    if reconstruct_cfg is not None and not calib:
        raise EdgePruneError("--reconstruct needs calibration data: pass --calib PATH")
    with staged_output(out, overwrite) as tmp:
        step = time.perf_counter()
        writer = ShardWriter(tmp, SHARD_BYTES, out_dtype)
        inputs = _capture_inputs(skeleton, adapter, weights, calib, run_dtype) if reconstruct_cfg else []
        report = _write_pass(loader, skeleton, adapter, plan, calib, inputs, writer, reconstruct_cfg, progress)
        del inputs
        release_memory()
        # the embedding table (and the rest) last, once no block or activation is resident any more; the
        # blocks' buffered tensors go to disk first unless they fit in one shard with it (a small model stays
        # one file; a table over SHARD_BYTES is written as soon as it is added)
        table = skeleton.get_input_embeddings().weight
        if writer.pending_bytes + table.numel() * out_dtype.itemsize > SHARD_BYTES:
            writer.flush()
        for name in weights.names():  # embeddings, final norm, and the LM head unless tied to the embeddings
            if not name.startswith(LAYER_PREFIX):
                if name == "lm_head.weight" and hf_config.tie_word_embeddings:
                    continue
                writer.add(name, weights.get(name, out_dtype))
        writer.finish()
        timings["write_pass_s"] = round(time.perf_counter() - step, 3)
        timings["compress_s"] = round(time.perf_counter() - started - timings["load_s"], 3)
        record_shapes(skeleton, plan.shapes)
        skeleton.config.dtype = out_dtype
        skeleton.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        import yaml

        recipe = config.to_dict()
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        extra = {"reconstruction": report} if report else {}
        write_manifest(tmp, "compress", recipe, {"model": source.to_dict()}, task=task,
                       auto_class=TASK_CLASSES[task], model_type=hf_config.model_type, parameters=writer.numel,
                       layer_shapes=[sh.to_dict() for sh in plan.shapes], dense_parameters=dense_parameters,
                       timings=timings, sequential={"dtype": str(out_dtype).replace("torch.", ""),
                                                    "compute_dtype": str(run_dtype).replace("torch.", ""),
                                                    "max_resident_blocks": loader.max_resident,
                                                    "calibration_batches": len(calib)}, **extra)
    return out
