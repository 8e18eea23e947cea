"""Task pipelines on a runtime Session: sentence embeddings, class probabilities, text generation with a
KV cache. Torch-free; the tokenizer comes from the export directory (``edgeprune.runtime.tokenizer``).

``edgeprune.eval.backends.RuntimeBackend`` wraps these pipelines for ``edgeprune eval --runtime X``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.onnxio import PAST_RE as _PAST, mean_pool_normalize, present_name
from edgeprune.runtime.tokenizer import RuntimeTokenizer, model_directory

TASKS = ("feature-extraction", "sequence-classification", "text-generation")
# DeepSparse compiles one engine per input shape; padding sequence lengths up to a multiple of this keeps
# the number of distinct shapes (and compiles) small. Padded tokens are masked, so results do not change.
STATIC_SHAPE_BUCKET = 16


@dataclass
class ExportInfo:
    """What the pipelines need to know about an export directory, from its manifest and config.json."""

    directory: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    task: str = "feature-extraction"
    with_past: bool = False

    @classmethod
    def read(cls, model_path: str | os.PathLike, input_names: list[str]) -> "ExportInfo":
        from edgeprune.core.artifacts import is_artifact, read_manifest

        directory = model_directory(model_path)
        manifest = read_manifest(directory) if is_artifact(directory) else {}
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        task = manifest.get("task") or _task_from_config(config)
        if task not in TASKS:
            raise EdgePruneError(f"{directory}: task {task!r} is not supported by the runtime pipelines "
                                 f"({', '.join(TASKS)})")
        with_past = any(_PAST.match(n) for n in input_names)
        return cls(directory, manifest, config, task, with_past)


def position_limit(config: dict) -> int | None:
    """Token positions a model can take, from its config.json (None: not recorded). RoBERTa-style models
    start positions after the padding index, so two of their table's rows are never usable."""
    limit = config.get("max_position_embeddings") or config.get("n_positions") or config.get("n_ctx")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(config.get("pad_token_id") or 0) + 1
    return limit


def check_positions(config: dict, tokens: int, what: str, where) -> None:
    """Refuse, before running, a length the model's position table cannot hold (ORT would fail in Gather)."""
    limit = position_limit(config)
    if limit is not None and tokens > limit:
        raise EdgePruneError(f"{what} {tokens} exceeds the {limit} token positions of {where}; use at most {limit}")


def _task_from_config(config: dict) -> str:
    archs = " ".join(config.get("architectures") or [])
    if "ForCausalLM" in archs or "LMHead" in archs:
        return "text-generation"
    if "ForSequenceClassification" in archs:
        return "sequence-classification"
    return "feature-extraction"


def load_session(model_path: str | os.PathLike, runtime: str = "onnxruntime", threads: int | None = None,
                 **options):
    from edgeprune.runtime.base import get_runtime

    return get_runtime(runtime).load(str(model_path), threads=threads, **options)


def _feeds(session, batch, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Model inputs from a tokenized batch: only the names the ONNX graph declares."""
    names = {i.name for i in session.inputs}
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = batch.token_type_ids
    if "position_ids" in names:
        feeds["position_ids"] = np.clip(np.cumsum(batch.attention_mask, axis=1) - 1, 0, None).astype(np.int64)
    feeds.update(extra or {})
    unknown = names - set(feeds)
    if unknown:
        raise EdgePruneError(f"the model needs inputs this pipeline cannot provide: {', '.join(sorted(unknown))}")
    return {k: v for k, v in feeds.items() if k in names}


def _bucket(session) -> int | None:
    return STATIC_SHAPE_BUCKET if getattr(session, "static_shapes", False) else None


def _right_padded(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A causal decoder's [B, L] inputs, right-padded with masked tokens to a multiple of STATIC_SHAPE_BUCKET
    for a static-shape session: fewer engines to compile, and DeepSparse 1.8 segfaults running a Llama graph on
    fewer than 16 tokens (docs/runtime.md). Causal attention leaves the real positions' outputs unchanged."""
    bucket = _bucket(session)
    pad = (-input_ids.shape[1]) % bucket if bucket else 0
    if not pad:
        return input_ids, attention_mask
    return np.pad(input_ids, ((0, 0), (0, pad))), np.pad(attention_mask, ((0, 0), (0, pad)))


class EmbeddingPipeline:
    """texts -> mean-pooled, L2-normalised sentence embeddings [N, hidden] (the eval's recipe)."""

    def __init__(self, session, tokenizer: RuntimeTokenizer, max_length: int = 128):
        self.session, self.tokenizer, self.max_length = session, tokenizer, max_length
        names = [o.name for o in session.outputs]
        rank3 = [o.name for o in session.outputs if len(o.shape) == 3]
        for candidate in ("last_hidden_state", "token_embeddings"):
            if candidate in names:
                self.output = candidate
                break
        else:
            if not rank3:
                raise EdgePruneError(f"no token-level hidden state among the model outputs ({', '.join(names)})")
            self.output = rank3[0]

    def __call__(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, max_length=self.max_length, pad_to_multiple_of=_bucket(self.session))
        hidden = self.session.run(_feeds(self.session, batch), [self.output])[self.output]
        return mean_pool_normalize(hidden.astype(np.float32), batch.attention_mask)


class ClassificationPipeline:
    """texts -> class probabilities [N, classes]; ``labels`` from config.json's id2label."""

    def __init__(self, session, tokenizer: RuntimeTokenizer, config: dict | None = None, max_length: int = 128):
        self.session, self.tokenizer, self.max_length = session, tokenizer, max_length
        if "logits" not in {o.name for o in session.outputs}:
            raise EdgePruneError("the model has no 'logits' output; is it a sequence-classification export?")
        id2label = (config or {}).get("id2label") or {}
        self.labels = [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(len(id2label))]

    def __call__(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, max_length=self.max_length, pad_to_multiple_of=_bucket(self.session))
        logits = self.session.run(_feeds(self.session, batch), ["logits"])["logits"].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        if len(self.labels) != probs.shape[-1]:  # config.json without id2label: transformers' default names
            self.labels = [f"LABEL_{i}" for i in range(probs.shape[-1])]
        return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def sample_next(logits: np.ndarray, rng: np.random.Generator | None, do_sample: bool, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> int:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return int(np.argmax(logits))
    if temperature <= 0:
        raise EdgePruneError("temperature must be > 0 when sampling")
    scores = logits.astype(np.float64) / temperature
    if top_k and top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int((rng or np.random.default_rng()).choice(probs.size, p=probs))


class GenerationPipeline:
    """text -> generated text for decoder exports, with a KV cache when the export has past inputs.

    Empty past tensors have shape [1, kv_heads, 0, head_dim] per layer, from the manifest's ``kv_layout``
    or, failing that, from the fixed dims the ONNX inputs declare.
    """

    def __init__(self, session, tokenizer: RuntimeTokenizer, info: ExportInfo):
        self.session, self.tokenizer, self.info = session, tokenizer, info
        names = {o.name for o in session.outputs}
        if "logits" not in names:
            raise EdgePruneError("the model has no 'logits' output; is it a text-generation export?")
        self.past_inputs = sorted((i for i in session.inputs if _PAST.match(i.name)),
                                  key=lambda i: (int(_PAST.match(i.name).group(1)), i.name))
        # Static-shape runtimes (DeepSparse) decode with a fixed-capacity cache (FixedCapacityCache), so only
        # two shapes occur: the padded prompt and the one-token step.
        self.fixed_capacity = bool(self.past_inputs) and getattr(session, "static_shapes", False)
        self.present_for = {}
        for info_ in self.past_inputs:
            present = present_name(info_.name)
            if present not in names:
                raise EdgePruneError(f"input {info_.name} has no matching output {present}")
            self.present_for[info_.name] = present
        self.empty_past = {i.name: self._empty(i) for i in self.past_inputs}
        self.output_names = ["logits"] + [self.present_for[i.name] for i in self.past_inputs]
        self.stopped_at_limit: int | None = None

    def _empty(self, tensor) -> np.ndarray:
        layer = int(_PAST.match(tensor.name).group(1))
        layout = self.info.manifest.get("kv_layout")
        if layout and layer < len(layout):
            heads, head_dim = int(layout[layer]["kv_heads"]), int(layout[layer]["head_dim"])
        elif len(tensor.shape) == 4 and isinstance(tensor.shape[1], int) and isinstance(tensor.shape[3], int):
            heads, head_dim = tensor.shape[1], tensor.shape[3]
        else:
            raise EdgePruneError(f"cannot tell the KV shape of {tensor.name} (no kv_layout in the manifest and "
                                 f"dynamic dims {tensor.shape}); re-export with edgeprune export")
        return np.zeros((1, heads, 0, head_dim), dtype=tensor.dtype)

    def _step(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int):
        total = past_len + len(ids)
        feeds = {"input_ids": ids[None, :], "attention_mask": np.ones((1, total), np.int64)}
        names = {i.name for i in self.session.inputs}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
        feeds.update(past)
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        if not past:  # a whole sequence without a cache: a static-shape session gets it padded (causal)
            length = feeds["input_ids"].shape[1]
            feeds["input_ids"], feeds["attention_mask"] = _right_padded(self.session, feeds["input_ids"],
                                                                        feeds["attention_mask"])
            if "position_ids" in feeds:
                feeds["position_ids"] = self._positions(feeds["input_ids"].shape[1])
        out = self.session.run({k: v for k, v in feeds.items() if k in names}, self.output_names)
        new_past = {name: out[self.present_for[name]] for name in self.present_for}
        last = total - past_len - 1 if not past else -1
        return out["logits"][0, last], new_past

    def _positions(self, length: int) -> np.ndarray:
        """0 .. length-1, padded positions held at the model's last one (their outputs are never read)."""
        limit = position_limit(self.info.config)
        positions = np.arange(length, dtype=np.int64)
        return (np.minimum(positions, limit - 1) if limit else positions)[None, :]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_on_eos: bool = True) -> list[int]:
        """New token ids after ``prompt_ids`` (the prompt is not included)."""
        if not prompt_ids:
            bos = self.tokenizer.token_id("bos_token")
            if bos is None:
                raise EdgePruneError("empty prompt and the tokenizer has no BOS token to start from")
            prompt_ids = [bos]
        if max_new_tokens < 0:
            raise EdgePruneError("max_new_tokens must be >= 0")
        limit = position_limit(self.info.config)
        self.stopped_at_limit = None  # the position limit when it cut the generation short
        if limit and len(prompt_ids) >= limit:
            raise EdgePruneError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most {limit} positions "
                                 "(prompt plus generated tokens): shorten it")
        if limit and len(prompt_ids) + max_new_tokens > limit:
            # Generate what fits and say so, rather than fail at the last position and lose the text.
            max_new_tokens = limit - len(prompt_ids)
            self.stopped_at_limit = limit
        rng = np.random.default_rng(seed)
        eos = set(self.tokenizer.eos_ids) if stop_on_eos else set()
        generated: list[int] = []
        sequence = np.asarray(prompt_ids, dtype=np.int64)
        past = dict(self.empty_past)
        past_len = 0
        pending = sequence
        cache = FixedCapacityCache(self, len(prompt_ids), max_new_tokens) if self.fixed_capacity else None
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = cache.step(pending)
            elif self.past_inputs:
                logits, past = self._step(pending, past, past_len)
                past_len += len(pending)
            else:  # no cache in this export: recompute the whole sequence each step
                logits, _ = self._step(sequence, {}, 0)
            token = sample_next(logits, rng, do_sample, temperature, top_k, top_p)
            generated.append(token)
            if token in eos:
                break
            sequence = np.append(sequence, token)
            pending = np.asarray([token], dtype=np.int64)
        return generated

    def __call__(self, text: str, max_new_tokens: int = 32, **kwargs) -> str:
        ids = self.generate_ids(self.tokenizer.encode(text), max_new_tokens, **kwargs)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits [1, L, V] (empty past when the export has a cache)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise EdgePruneError(f"logits expects input_ids of shape [1, L], got {input_ids.shape}")
        names = {i.name for i in self.session.inputs}
        length = input_ids.shape[1]
        check_positions(self.info.config, length, "a sequence of", self.info.directory)
        padded_ids, mask = _right_padded(self.session, input_ids, np.ones((1, length), np.int64))
        feeds = {"input_ids": padded_ids, "attention_mask": mask,
                 "position_ids": self._positions(padded_ids.shape[1]), **self.empty_past}
        return self.session.run({k: v for k, v in feeds.items() if k in names}, ["logits"])["logits"][:, :length]

    def batch_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of a right-padded batch in one call (empty past of batch B when the export has
        a cache); positions count real tokens only, so each row scores as it would alone."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise EdgePruneError(f"batch_logits expects input_ids and attention_mask of one shape [B, L], "
                                 f"got {input_ids.shape} and {attention_mask.shape}")
        return self.run_batch(self.session, input_ids, attention_mask, "logits")

    def run_batch(self, session, input_ids: np.ndarray, attention_mask: np.ndarray, output: str) -> np.ndarray:
        """``output`` of ``session`` (this export's graph or one derived from it, as edgeprune.runtime.lm_head
        writes) for a right-padded batch with an empty past."""
        rows, length = input_ids.shape
        input_ids, attention_mask = _right_padded(session, input_ids, attention_mask)
        names = {i.name for i in session.inputs}
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)}
        feeds.update({name: np.repeat(empty, rows, axis=0) for name, empty in self.empty_past.items()})
        return session.run({k: v for k, v in feeds.items() if k in names}, [output])[output][:, :length]


class FixedCapacityCache:
    """KV-cache decoding with static shapes, in DeepSparse's own layout (deepsparse.transformers
    ``DecoderKVCache`` / ``NLDecoderEngine``): the cache always holds ``capacity - input length`` slots, real
    entries right-aligned, and ``attention_mask`` (length ``capacity``) masks the empty ones. The prompt runs
    once, left-padded to a multiple of 16 tokens; then every step feeds one token with a ``capacity - 1`` slot
    cache and drops the oldest slot of ``present`` (always an empty one: the capacity covers prompt plus
    generated tokens, rounded up to a multiple of 64). So a generation needs two engine shapes, not one per
    step. Padded slots are masked keys; their own outputs are never read."""

    CAPACITY_BUCKET = 64

    def __init__(self, pipeline: GenerationPipeline, prompt_len: int, max_new_tokens: int):
        self.pipeline = pipeline
        self.prompt_slots = -(-prompt_len // STATIC_SHAPE_BUCKET) * STATIC_SHAPE_BUCKET
        needed = max(prompt_len + max_new_tokens, self.prompt_slots + 1)
        self.capacity = -(-needed // self.CAPACITY_BUCKET) * self.CAPACITY_BUCKET
        self.cache = {name: np.zeros(empty.shape[:2] + (self.capacity - self.prompt_slots,) + empty.shape[3:],
                                     empty.dtype) for name, empty in pipeline.empty_past.items()}
        self.real = 0  # tokens in the cache after the current step

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits of the last of ``ids`` (the whole prompt first, then one token per call)."""
        slots = self.prompt_slots if self.real == 0 else 1
        count = len(ids)
        if count > slots or self.real + count >= self.capacity + 1:
            raise EdgePruneError(f"fixed-capacity KV cache: {count} tokens do not fit ({self.real} of "
                                 f"{self.capacity} slots used)")
        input_ids = np.zeros((1, slots), np.int64)
        input_ids[0, slots - count:] = ids
        positions = np.zeros((1, slots), np.int64)
        positions[0, slots - count:] = np.arange(self.real, self.real + count)
        self.real += count
        mask = np.zeros((1, self.capacity), np.int64)
        mask[0, self.capacity - self.real:] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **self.cache}
        session = self.pipeline.session
        names = {i.name for i in session.inputs}
        out = session.run({k: v for k, v in feeds.items() if k in names}, self.pipeline.output_names)
        keep = self.capacity - 1  # the next call feeds one token
        self.cache = {name: out[present][:, :, -keep:] for name, present in self.pipeline.present_for.items()}
        return out["logits"][0, -1]


class StatefulGenerationPipeline(GenerationPipeline):
    """Generation on a session that keeps its own KV cache and tokenizer (llama.cpp): the prompt is fed
    once, then one token per step."""

    stopped_at_limit = None  # llama.cpp raises ContextOverflow (with the text so far) instead of stopping

    def __init__(self, session):
        self.session, self.tokenizer, self.info = session, session, None

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32, **kwargs) -> list[int]:
        if max_new_tokens < 0:
            raise EdgePruneError("max_new_tokens must be >= 0")
        if not prompt_ids:
            prompt_ids = self.session.encode("", add_special_tokens=True)
            if not prompt_ids:
                raise EdgePruneError("empty prompt and the model adds no BOS token to start from")
        return self.session.generate_ids(list(prompt_ids), max_new_tokens, **kwargs) if max_new_tokens else []

    def __call__(self, text: str, max_new_tokens: int = 32, **kwargs) -> str:
        try:
            ids = self.generate_ids(self.session.encode(text), max_new_tokens, **kwargs)
        except EdgePruneError as exc:
            generated = getattr(exc, "generated", None)
            if generated is not None:  # context overflow: the caller can still show what was generated
                exc.generated_text = self.session.decode(generated)
            raise
        return self.session.decode(ids, skip_special_tokens=True)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.session.logits(np.asarray(input_ids, dtype=np.int64))


def build_pipeline(model_path: str | os.PathLike, runtime: str = "onnxruntime", threads: int | None = None,
                   max_length: int = 128, session=None):
    """The pipeline that suits the export's task, loaded on ``runtime``."""
    session = session or load_session(model_path, runtime, threads)
    if getattr(session, "stateful_decoder", False):
        return StatefulGenerationPipeline(session)
    info = ExportInfo.read(model_path, [i.name for i in session.inputs])
    tokenizer = RuntimeTokenizer(info.directory)
    if info.task != "text-generation":
        check_positions(info.config, max_length, "--max-length", info.directory)
    if info.task == "text-generation":
        return GenerationPipeline(session, tokenizer, info)
    if info.task == "sequence-classification":
        return ClassificationPipeline(session, tokenizer, info.config, max_length)
    return EmbeddingPipeline(session, tokenizer, max_length)
