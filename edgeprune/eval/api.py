"""``evaluate``: one model (source, artifact or export) on one task, through PyTorch or a runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError

TASKS = ("sts", "perplexity", "lambada", "hellaswag", "piqa")
ZERO_SHOT = ("lambada", "hellaswag", "piqa")  # scored as lm-evaluation-harness does (edgeprune.eval.zeroshot)
LM_TASKS = ("perplexity",) + ZERO_SHOT  # tasks that need a language-model head


@dataclass(frozen=True)
class EvalConfig(FrozenConfig):
    task: str = "sts"
    limit: int | None = None  # STS pairs / zero-shot items to use (None: all)
    max_tokens: int = 20000  # perplexity: tokens of the corpus to score
    window: int = 512
    stride: int = 256
    batch_size: int = 64
    max_length: int = 128
    batch_tokens: int = 2048  # zero-shot: padded tokens per forward pass beyond its first sequence

    def __post_init__(self):
        if self.task not in TASKS:
            raise EdgePruneError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.task == "sts" and self.limit is not None and self.limit < 2:
            raise EdgePruneError(f"--limit must be >= 2 (got {self.limit}): a Spearman correlation needs at least "
                                 "two pairs")
        if self.limit is not None and self.limit < 1:
            raise EdgePruneError(f"--limit must be >= 1 (got {self.limit})")
        if self.batch_size < 1 or self.batch_tokens < 1:
            raise EdgePruneError(f"--batch-size >= 1 and batch_tokens >= 1 needed (got {self.batch_size}, "
                                 f"{self.batch_tokens})")
        if self.stride < 1 or self.window < 2 or self.stride > self.window:
            raise EdgePruneError("perplexity needs 1 <= stride <= window")
        if self.max_tokens < 2 or self.max_length < 2:
            raise EdgePruneError(f"--max-tokens and max_length must be >= 2 (got {self.max_tokens}, {self.max_length})")


def _is_export(model: str | Path) -> bool:
    from edgeprune.core.artifacts import is_artifact, read_manifest

    path = Path(model)
    if path.is_file():
        return path.suffix == ".onnx"
    return path.is_dir() and is_artifact(path) and read_manifest(path).get("stage") == "export"


def require_lm_head(model: str | Path, task: str) -> None:
    """Refuse an encoder for a language-model task before any weights load: AutoModelForCausalLM would give
    it a randomly initialised head and score noise."""
    import transformers

    from edgeprune.core.arch import get_adapter
    from edgeprune.core.loading import resolve

    source = resolve(model)
    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    try:
        config = transformers.AutoConfig.from_pretrained(source.directory, trust_remote_code=False, **kwargs)
    except (OSError, ValueError):
        return  # load_model reports an unreadable config with its own message
    if not get_adapter(config).is_decoder:
        raise EdgePruneError(f"{model}: --task {task} needs a decoder with a language-model head; this is a "
                             f"{config.model_type} encoder with no language-model head (use --task sts for sentence encoders)")


def _require_runtime_lm(backend, model, task: str) -> None:
    if backend.task != "text-generation":
        backend.close()
        raise EdgePruneError(f"{model}: --task {task} needs a text-generation export with logits; this export's "
                             f"task is {backend.task} (export a decoder with --task text-generation)")


def make_backend(model: str | Path, runtime: str | None, task: str, max_length: int, threads: int | None = None):
    """PyTorch backend for models and compressed artifacts; a runtime backend for exported ONNX (onnxruntime
    unless told otherwise, as ``edgeprune run`` does)."""
    if runtime is None and _is_export(model):
        runtime = "onnxruntime"
    if runtime in (None, "pytorch", "torch"):
        from edgeprune.eval.backends import TorchBackend
        from edgeprune.core.loading import load_model

        if task in LM_TASKS:
            require_lm_head(model, task)
        loaded = load_model(model, task="text-generation" if task in LM_TASKS else "feature-extraction")
        if task == "sts" and loaded.adapter.is_decoder:
            raise EdgePruneError(f"{model}: a {loaded.model.config.model_type} decoder is not a sentence encoder; "
                                 "STS needs an encoder (e.g. minilm), score decoders with --task perplexity")
        return TorchBackend(loaded, max_length=max_length, threads=threads)
    from edgeprune.eval.backends import runtime_backend
    from edgeprune.runtime.pipelines import ExportInfo

    if task in LM_TASKS and runtime != "llamacpp":
        # the export's recorded task decides before any session loads (a large encoder takes a while)
        try:
            recorded = ExportInfo.read(model, []).task
        except (EdgePruneError, OSError, ValueError):
            recorded = None  # unreadable here: the runtime's own loading reports it
        if recorded is not None and recorded != "text-generation":
            raise EdgePruneError(f"{model}: --task {task} needs a text-generation export with logits; this "
                                 f"export's task is {recorded} (export a decoder with --task text-generation)")
    backend = runtime_backend(model, runtime, max_length=max_length, threads=threads)
    if task in LM_TASKS:
        _require_runtime_lm(backend, model, task)
    if task == "sts" and backend.task == "text-generation":
        backend.close()
        raise EdgePruneError(f"{model}: a text-generation export is not a sentence encoder; STS needs an encoder, "
                             "score decoders with --task perplexity")
    return backend


def resolve_task_data(task: str, data: str | Path | None) -> Path:
    """``data`` (a file or a built-in key), else the task's dev set (edgeprune.core.data_sources.TASK_DEFAULT_DATA)."""
    from edgeprune.core.data_sources import TASK_DEFAULT_DATA, resolve_data

    return resolve_data(data if data is not None else TASK_DEFAULT_DATA[task])


def evaluate_backend(backend, data: str | Path, config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    from edgeprune.core.datasets import read_corpus, read_sts
    from edgeprune.eval.metrics import sliding_window_perplexity, sts_spearman

    started = time.perf_counter()
    positions = getattr(backend, "positions", None)
    if config.task == "perplexity" and positions and config.window > positions:
        raise EdgePruneError(f"--window {config.window} exceeds the model's {positions} token positions; "
                             f"use --window {positions} or less")
    if config.task in ZERO_SHOT:
        from edgeprune.eval.zeroshot import evaluate_zero_shot, read_items

        items = read_items(config.task, data, limit=config.limit)
        result = evaluate_zero_shot(backend, config.task, items, batch_size=config.batch_size,
                                    batch_tokens=config.batch_tokens, progress=progress)
    elif config.task == "sts":
        pairs = read_sts(data, limit=config.limit)
        if len(pairs) < 2:
            raise EdgePruneError(f"{data}: {len(pairs)} STS pair; a Spearman correlation needs at least two")
        value, _ = sts_spearman(backend.embed, pairs, batch_size=config.batch_size, progress=progress)
        result = {"task": "sts", "metric": "spearman_x100", "value": round(value, 4), "n": len(pairs)}
    else:
        ids = np.asarray(backend.encode(read_corpus(data)), dtype=np.int64)[: config.max_tokens]
        if len(ids) < 2:
            raise EdgePruneError(f"{data}: too little text for perplexity")
        ppl, scored = sliding_window_perplexity(ids, backend.logits, config.window, config.stride, progress)
        result = {"task": "perplexity", "metric": "perplexity", "value": round(ppl, 4), "n": scored,
                  "window": config.window, "stride": config.stride}
    result.update({"backend": backend.name, "data": str(data), "seconds": round(time.perf_counter() - started, 2)})
    return result


def evaluate(model: str | Path, data: str | Path | None, config: EvalConfig | None = None,
             runtime: str | None = None, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    config = config or EvalConfig()
    from edgeprune.core.datasets import read_text

    data = resolve_task_data(config.task, data)
    if config.task in ZERO_SHOT:
        from edgeprune.eval.zeroshot import read_items

        read_items(config.task, data, limit=config.limit)  # a malformed file fails before a model loads
    read_text(data)  # fail on unreadable data before loading a model
    backend = make_backend(model, runtime, config.task, config.max_length, threads)
    result = evaluate_backend(backend, data, config, progress)
    result["model"] = str(model)
    return result
