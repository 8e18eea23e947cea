"""Backend-agnostic quality gate for text-generation exports (ONNX, GGUF, ...): perplexity and greedy agreement.

Top-1 agreement on random or calibration positions alone is a poor judge of a quantized decoder: a good 4-bit
model disagrees on many near-tied positions (rejected), while a model that is wrong where it matters can still
agree on easy ones (accepted). This gate asks the two questions a user cares about instead:

* **perplexity ratio**: candidate perplexity / reference perplexity on the same tokens, scored with the
  project's sliding-window perplexity (``edgeprune.eval.metrics``; windows of ``window`` tokens, stride
  ``window // 2``, the ``edgeprune eval`` default shape), must be ``<= max_ppl_ratio``;
* **greedy agreement**: the reference greedily continues the first ``greedy_prompt_len`` tokens for
  ``greedy_tokens`` steps (its *greedy path*). The candidate is teacher-forced on that path (one call on
  prompt + path) and, at each of the ``greedy_tokens`` positions, its top-1 token is compared with the
  reference's choice. ``agreement`` = fraction of positions that agree, must be ``>= min_greedy_agreement``.
  Teacher forcing keeps one early disagreement from counting every later position as wrong.
  ``exact_prefix`` = number of leading positions that agree, which is exactly how many tokens the candidate's
  own free-running greedy decoding reproduces before it first departs from the reference (up to the two
  models' floating-point noise at different sequence lengths); it is reported, not gated.

Both models are plain callables ``int64 ids [1, T] -> float32 logits [1, T, V]`` so the same gate serves every
runtime. numpy only: importable without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.eval.metrics import sliding_window_perplexity

LogitsFn = Callable[[np.ndarray], np.ndarray]


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf/NaN; a non-finite number is recorded as null (and the gate fails)."""
    return float(value) if math.isfinite(value) else None


class _ArgmaxRecorder:
    """Wraps a logits callable and keeps the top-1 id of every position it returned, call by call."""

    def __init__(self, fn: LogitsFn):
        self.fn, self.top1 = fn, []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.fn(ids))
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise EdgePruneError(f"logits callable returned shape {logits.shape} for ids of shape {ids.shape} "
                                 "(expected [1, T, V])")
        self.top1.append(logits[0].argmax(-1))
        return logits


def greedy_path(reference: LogitsFn, prompt: np.ndarray, steps: int) -> list[int]:
    """The reference's greedy continuation of ``prompt`` (full recompute each step: no cache assumed)."""
    ids = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
    generated: list[int] = []
    for _ in range(steps):
        token = int(np.asarray(reference(ids))[0, -1].argmax())
        generated.append(token)
        ids = np.concatenate([ids, np.array([[token]], dtype=np.int64)], axis=1)
    return generated


@dataclass(frozen=True)
class ReferenceRun:
    """Everything the gate needs from the reference, computed before the candidate is loaded: a large model's
    reference and the candidate's copy of it need not be in memory together."""

    token_ids: tuple[int, ...]
    window: int
    greedy_prompt_len: int
    perplexity: float
    scored: int
    window_top1: tuple[np.ndarray, ...]  # per window, the reference's top-1 id at every position
    greedy_path: tuple[int, ...]


def reference_run(reference: LogitsFn, token_ids, *, window: int = 512, greedy_prompt_len: int = 32,
                  greedy_tokens: int = 32) -> ReferenceRun:
    ids = _check_gate_input(token_ids, window, greedy_prompt_len, greedy_tokens)
    recorder = _ArgmaxRecorder(reference)
    ppl, scored = sliding_window_perplexity(ids, recorder, window, max(window // 2, 1))
    path = greedy_path(reference, ids[:greedy_prompt_len], greedy_tokens)
    return ReferenceRun(tuple(int(i) for i in ids), int(window), int(greedy_prompt_len), float(ppl), int(scored),
                        tuple(recorder.top1), tuple(path))


def _check_gate_input(token_ids, window: int, greedy_prompt_len: int, greedy_tokens: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if window < 2:
        raise EdgePruneError(f"decoder gate: window must be >= 2 (got {window})")
    if greedy_prompt_len < 1 or greedy_tokens < 1:
        raise EdgePruneError("decoder gate: greedy_prompt_len and greedy_tokens must be >= 1")
    if len(ids) < max(greedy_prompt_len, 2):
        raise EdgePruneError(f"decoder gate: {len(ids)} tokens given, need at least {max(greedy_prompt_len, 2)}")
    return ids


def decoder_quality_gate(reference: LogitsFn | ReferenceRun, candidate: LogitsFn, token_ids, *, window: int = 512,
                         greedy_prompt_len: int = 32, greedy_tokens: int = 32, max_ppl_ratio: float,
                         min_greedy_agreement: float) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` (a logits callable, or its ``reference_run`` on the same
    tokens and settings) on ``token_ids`` (1-D); returns a JSON-able report whose ``passed`` is true when the
    perplexity ratio and the greedy agreement are both within tolerance.

    See the module docstring for the exact definitions. Raises ``EdgePruneError`` for unusable inputs only;
    a failing candidate is reported, not raised."""
    ids = _check_gate_input(token_ids, window, greedy_prompt_len, greedy_tokens)
    if not isinstance(reference, ReferenceRun):
        reference = reference_run(reference, ids, window=window, greedy_prompt_len=greedy_prompt_len,
                                  greedy_tokens=greedy_tokens)
    elif (reference.token_ids != tuple(int(i) for i in ids) or reference.window != window
          or reference.greedy_prompt_len != greedy_prompt_len or len(reference.greedy_path) != greedy_tokens):
        raise EdgePruneError("decoder gate: the reference run was computed on other tokens or settings")
    ref_ppl, scored = reference.perplexity, reference.scored
    stride = max(window // 2, 1)
    cand_rec = _ArgmaxRecorder(candidate)
    cand_ppl, _ = sliding_window_perplexity(ids, cand_rec, window, stride)
    # Both saw the same windows in the same order: position-wise top-1 agreement comes for free (informational;
    # overlapping window positions count once per window).
    window_top1 = float(np.mean(np.concatenate(
        [r == c for r, c in zip(reference.window_top1, cand_rec.top1)]))) if reference.window_top1 else 0.0
    ratio = cand_ppl / ref_ppl if ref_ppl > 0 else float("inf")

    prompt = ids[:greedy_prompt_len]
    path = list(reference.greedy_path)
    forced = np.concatenate([prompt, np.asarray(path[:-1], dtype=np.int64)]).reshape(1, -1)
    cand_logits = np.asarray(candidate(forced))[0]
    cand_top1 = cand_logits[greedy_prompt_len - 1:].argmax(-1).astype(np.int64).tolist()
    agrees = [int(a == b) for a, b in zip(path, cand_top1)]
    exact_prefix = next((i for i, ok in enumerate(agrees) if not ok), len(agrees))
    greedy_agreement = sum(agrees) / len(agrees)

    ppl_ok = math.isfinite(ratio) and ratio <= max_ppl_ratio
    greedy_ok = greedy_agreement >= min_greedy_agreement
    return {
        "metric": "decoder_quality",
        "perplexity": {"reference": _finite_or_none(ref_ppl), "candidate": _finite_or_none(cand_ppl),
                       "ratio": _finite_or_none(ratio), "max_ratio": float(max_ppl_ratio), "tokens": int(scored),
                       "window": int(window), "stride": int(stride), "passed": bool(ppl_ok)},
        "greedy": {"prompt_tokens": int(len(prompt)), "new_tokens": int(greedy_tokens),
                   "agreement": float(greedy_agreement), "min_agreement": float(min_greedy_agreement),
                   "exact_prefix": int(exact_prefix), "reference_tokens": [int(t) for t in path],
                   "candidate_top1": [int(t) for t in cand_top1], "passed": bool(greedy_ok),
                   "definition": "candidate top-1 teacher-forced along the reference's greedy path"},
        "window_top1_agreement": window_top1,
        "passed": bool(ppl_ok and greedy_ok),
    }


def gate_bounds(config, defaults: tuple[float, float]) -> tuple[float, float]:
    """The gate's (max perplexity ratio, min greedy agreement): the export config's ``max_ppl_ratio`` /
    ``min_greedy_agreement`` where the user set them, else the format's ``defaults``."""
    return (defaults[0] if config.max_ppl_ratio is None else config.max_ppl_ratio,
            defaults[1] if config.min_greedy_agreement is None else config.min_greedy_agreement)
