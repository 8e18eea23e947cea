"""Zero-shot log-likelihood tasks (LAMBADA, HellaSwag, PIQA), scored as lm-evaluation-harness does. Torch-free.

A task turns each item into (context, continuation) requests; the scorer encodes them like lm-eval's HFLM
(``_encode_pair``: trailing spaces of the context move to the continuation, and the continuation tokens are
``encode(context + continuation)`` minus ``encode(context)``), runs them through a backend in length-sorted,
right-padded batches (one forward pass per request, every choice of an item in the same pass when it fits)
and returns each request's summed log-probability and whether greedy argmax reproduces it.

A backend needs only::

    name: str
    encode_for_scoring(text) -> list[int]                    # the tokenizer's own special-token behaviour
    batch_logits(input_ids [B, L] int64, attention_mask [B, L] int64) -> logits [B, L, V]   # right padding

``TorchBackend`` and ``RuntimeBackend`` provide them; any runtime that returns logits for a batch can too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError

ZERO_SHOT_TASKS = ("lambada", "hellaswag", "piqa")
# What each task reports first (``value``); the others are secondary metrics in the same result.
HEADLINE = {"lambada": "acc", "hellaswag": "acc_norm", "piqa": "acc"}
FIELDS = {
    "lambada": '{"text"}',
    "hellaswag": '{"activity_label", "ctx" (or "ctx_a" and "ctx_b"), "endings": [4 strings], "label"}',
    "piqa": '{"goal", "sol1", "sol2", "label"}',
}


@dataclass(frozen=True)
class Item:
    """One task item: a context, its candidate continuations and the gold index (LAMBADA: one, gold 0)."""

    context: str
    continuations: tuple[str, ...]  # as scored, with the leading target delimiter (" ")
    choices: tuple[str, ...]  # as lm-eval counts them for acc_norm (without the delimiter)
    gold: int = 0


# --- readers ---------------------------------------------------------------------------------------------

def _bad(path, number: int, task: str, why: str) -> EdgePruneError:
    return EdgePruneError(f"{path}:{number}: not a {task} item ({why}); expected one JSON object per line "
                          f"with {FIELDS[task]}")


def _label(row: dict, count: int) -> int:
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError("label must be an integer")
    label = int(label)
    if not 0 <= label < count:
        raise ValueError(f"label {label} out of range 0..{count - 1}")
    return label


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip, WikiHow ``[title]`` becomes a sentence end, other bracketed
    markers go, double spaces collapse."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_LAST_FRAGMENT = re.compile(r"(^|[.!?]\s+)([a-z])(?=[^.!?]*$)")


def hellaswag_query(row: dict) -> str:
    """lm-eval's query ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``.

    Three row forms: with ``ctx_a``/``ctx_b`` (the hub's fields) the query is exactly lm-eval's; a ``ctx``
    that already starts with ``activity_label: `` (llama.cpp's text form) is used as it is; a raw ``ctx``
    (``ctx_a + " " + ctx_b``, as in the offline mirror) gets the capital letter ``capitalize()`` gives
    ``ctx_b``: the first letter of its last sentence fragment, where ``ctx_b`` sits.
    """
    label = row["activity_label"]
    if "ctx_a" in row and "ctx_b" in row:
        ctx_b = str(row["ctx_b"])
        ctx = str(row["ctx_a"]) + " " + ctx_b.capitalize()
    else:
        ctx = str(row["ctx"])
        if ctx.startswith(label + ": "):
            return hellaswag_preprocess(ctx)
        ctx = _LAST_FRAGMENT.sub(lambda m: m.group(1) + m.group(2).upper(), ctx, count=1)
    return hellaswag_preprocess(label + ": " + ctx)


def _lambada_item(row: dict) -> Item:
    text = row["text"]
    if not isinstance(text, str) or " " not in text.strip():
        raise ValueError('"text" must be a passage of at least two words')
    words = text.split(" ")  # lm-eval splits on single spaces, not on any whitespace
    target = words[-1]
    if not target:
        raise ValueError("the passage ends with a space, so its last word is empty")
    return Item(" ".join(words[:-1]), (" " + target,), (target,), 0)


def _hellaswag_item(row: dict) -> Item:
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError('"endings" must be a list of strings')
    if not isinstance(row["activity_label"], str):
        raise ValueError('"activity_label" must be a string')
    if "ctx" not in row and not ("ctx_a" in row and "ctx_b" in row):
        raise KeyError("ctx")
    choices = tuple(hellaswag_preprocess(e) for e in endings)
    return Item(hellaswag_query(row), tuple(" " + c for c in choices), choices, _label(row, len(choices)))


def _piqa_item(row: dict) -> Item:
    if not all(isinstance(row[k], str) for k in ("goal", "sol1", "sol2")):
        raise ValueError('"goal", "sol1" and "sol2" must be strings')
    choices = (row["sol1"], row["sol2"])
    return Item(f"Question: {row['goal']}\nAnswer:", tuple(" " + c for c in choices), choices, _label(row, 2))


_BUILDERS: dict[str, Callable[[dict], Item]] = {"lambada": _lambada_item, "hellaswag": _hellaswag_item,
                                                "piqa": _piqa_item}


def read_items(task: str, path: str | Path, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of a task's jsonl file; one clear error for the first line that is not one."""
    from edgeprune.core.datasets import read_text

    if task not in _BUILDERS:
        raise EdgePruneError(f"unknown zero-shot task {task!r}; choose from {', '.join(ZERO_SHOT_TASKS)}")
    if limit is not None and limit < 1:
        raise EdgePruneError(f"--limit must be >= 1 (got {limit})")
    items = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise _bad(path, number, task, "not JSON") from None
        if not isinstance(row, dict):
            raise _bad(path, number, task, "not a JSON object")
        try:
            items.append(_BUILDERS[task](row))
        except KeyError as exc:
            raise _bad(path, number, task, f"no field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise _bad(path, number, task, str(exc)) from None
        if limit and len(items) >= limit:
            break
    if not items:
        raise EdgePruneError(f"{path}: empty file, no {task} items; expected one JSON object per line with "
                             f"{FIELDS[task]}")
    return items


# --- encoding and scoring ----------------------------------------------------------------------------------

def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                empty_context_id: int | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for causal models (and its empty-context rule: one prefix token)."""
    if not context:
        if empty_context_id is None:
            raise EdgePruneError("an empty context needs a BOS/EOS token to condition on; the tokenizer has none")
        return [empty_context_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass(frozen=True)
class Request:
    """One forward pass: ``tokens`` is the model input, the last ``n_target`` positions' next tokens are
    ``targets`` (so the input is context + continuation without its final token, as lm-eval feeds it)."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]


def build_request(context_ids: Sequence[int], continuation_ids: Sequence[int], max_positions: int | None) -> Request:
    if not continuation_ids:
        raise EdgePruneError("a continuation encodes to no tokens; nothing to score")
    whole = list(context_ids) + list(continuation_ids)
    if max_positions:
        whole = whole[-(max_positions + 1):]  # lm-eval keeps the end: left truncation
    return Request(tuple(whole[:-1]), tuple(continuation_ids))


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def plan_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Request indices grouped longest first; a batch holds at most ``batch_size`` rows and, beyond its first
    row, at most ``batch_tokens`` padded tokens (so the logits tensor stays bounded)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= batch_size or (len(current) + 1) * width > batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def score_requests(backend, requests: Sequence[Request], batch_size: int = 32, batch_tokens: int = 2048,
                   pad_id: int = 0, progress: bool = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """(sum of target log-probabilities, greedy argmax reproduces every target) for each request."""
    from tqdm.auto import tqdm

    results: list[tuple[float, bool] | None] = [None] * len(requests)
    lengths = [len(r.tokens) for r in requests]
    batches = plan_batches(lengths, batch_size, batch_tokens)
    with tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches:
            width = max(lengths[i] for i in batch)
            ids = np.full((len(batch), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, index in enumerate(batch):
                ids[row, :lengths[index]] = requests[index].tokens
                mask[row, :lengths[index]] = 1
            logits = backend.batch_logits(ids, mask)
            for row, index in enumerate(batch):
                request, end = requests[index], lengths[index]
                n = len(request.targets)
                rows = log_softmax_rows(logits[row, end - n:end])
                targets = np.asarray(request.targets, dtype=np.int64)
                logprob = float(rows[np.arange(n), targets].sum())
                greedy = bool((rows.argmax(axis=-1) == targets).all())
                results[index] = (logprob, greedy)
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def _stderr(values: np.ndarray) -> float:
    """Standard error of a mean (sample standard deviation / sqrt n), as lm-eval's ``mean_stderr``."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def metrics(task: str, items: Sequence[Item], scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's per-task metrics from the per-request scores (requests in item order, choices in order)."""
    if task == "lambada":
        logprobs = np.array([s[0] for s in scores])
        acc = np.array([float(s[1]) for s in scores])
        # lm-eval's ``perplexity`` aggregation: exp of minus the mean per-item log-likelihood
        return {"acc": float(acc.mean()), "acc_stderr": _stderr(acc),
                "perplexity": float(math.exp(-logprobs.mean()))}
    acc, acc_norm, position = [], [], 0
    for item in items:
        lls = np.array([s[0] for s in scores[position:position + len(item.continuations)]])
        position += len(item.continuations)
        lengths = np.array([float(len(c)) for c in item.choices])
        acc.append(float(np.argmax(lls) == item.gold))
        acc_norm.append(float(np.argmax(lls / lengths) == item.gold))
    acc_a, norm_a = np.array(acc), np.array(acc_norm)
    return {"acc": float(acc_a.mean()), "acc_stderr": _stderr(acc_a),
            "acc_norm": float(norm_a.mean()), "acc_norm_stderr": _stderr(norm_a)}


def item_requests(backend, items: Sequence[Item], max_positions: int | None = None,
                  empty_context_id: int | None = None) -> list[Request]:
    """Every item's requests in item order, choices in order; each distinct string encoded once."""
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(backend.encode_for_scoring(text))
        return cache[text]

    requests = []
    for item in items:
        for continuation in item.continuations:
            ctx_ids, cont_ids = encode_pair(encode, item.context, continuation, empty_context_id)
            requests.append(build_request(ctx_ids, cont_ids, max_positions))
    return requests


def evaluate_zero_shot(backend, task: str, items: Sequence[Item], batch_size: int = 32, batch_tokens: int = 2048,
                       progress: bool = False) -> dict[str, Any]:
    """The task's metrics on ``items`` through ``backend`` (see the module docstring for its interface)."""
    requests = item_requests(backend, items, getattr(backend, "max_positions", None),
                             getattr(backend, "prefix_token_id", None))
    scores = score_requests(backend, requests, batch_size, batch_tokens, getattr(backend, "pad_id", 0) or 0,
                            progress, desc=task)
    values = metrics(task, items, scores)
    headline = HEADLINE[task]
    result = {"task": task, "metric": headline, "value": round(values[headline], 6)}
    result.update({k: round(v, 6) for k, v in values.items()})
    result.update({"n": len(items), "requests": len(requests),
                   "tokens": int(sum(len(r.tokens) for r in requests))})
    return result
