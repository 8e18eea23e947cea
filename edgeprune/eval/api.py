"""``evaluate``: one model (source, artifact or export) on one task, through PyTorch or a runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.configs import FrozenConfig
from edgeprune.errors import EdgePruneError

TASKS = ("sts", "perplexity")


@dataclass(frozen=True)
class EvalConfig(FrozenConfig):
    task: str = "sts"
    limit: int | None = None  # STS pairs to use (None: all)
    max_tokens: int = 20000  # perplexity: tokens of the corpus to score
    window: int = 512
    stride: int = 256
    batch_size: int = 64
    max_length: int = 128

    def __post_init__(self):
        if self.task not in TASKS:
            raise EdgePruneError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.stride < 1 or self.window < 2 or self.stride > self.window:
            raise EdgePruneError("perplexity needs 1 <= stride <= window")


def make_backend(model: str | Path, runtime: str | None, task: str, max_length: int, threads: int | None = None):
    """PyTorch backend for models and compressed artifacts; a runtime backend for exported ONNX."""
    if runtime in (None, "pytorch", "torch"):
        from edgeprune.eval.torch_backend import TorchBackend
        from edgeprune.models import load_model

        loaded = load_model(model, task="text-generation" if task == "perplexity" else "feature-extraction")
        return TorchBackend(loaded, max_length=max_length, threads=threads)
    from edgeprune.runtime.pipelines import runtime_backend

    return runtime_backend(model, runtime, max_length=max_length, threads=threads)


def evaluate_backend(backend, data: str | Path, config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    from edgeprune.eval.data import read_corpus, read_sts
    from edgeprune.eval.metrics import sliding_window_perplexity, sts_spearman

    started = time.perf_counter()
    if config.task == "sts":
        pairs = read_sts(data, limit=config.limit)
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


def evaluate(model: str | Path, data: str | Path, config: EvalConfig | None = None, runtime: str | None = None,
             threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    config = config or EvalConfig()
    from edgeprune.eval.data import read_text

    read_text(data)  # fail on unreadable data before loading a model
    backend = make_backend(model, runtime, config.task, config.max_length, threads)
    result = evaluate_backend(backend, data, config, progress)
    result["model"] = str(model)
    return result
