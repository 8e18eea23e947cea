"""Numpy-only metrics: Spearman correlation, perplexity from logits, agreement (pooling: ``core.onnxio``)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as scipy.stats.rankdata(method='average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else 0.0


def sts_spearman(embed: Callable[[list[str]], np.ndarray], pairs, batch_size: int = 64,
                 progress: bool = False) -> tuple[float, np.ndarray]:
    """Spearman x 100 of cosine(embedding1, embedding2) against gold scores; also returns the cosines."""
    from tqdm.auto import tqdm

    # Sorted by length, then text: batches (and their padding) must not depend on set iteration order,
    # which changes from run to run with string hashing.
    sentences = sorted({s for p in pairs for s in (p.sentence1, p.sentence2)}, key=lambda s: (len(s), s))
    vectors: dict[str, np.ndarray] = {}
    batches = range(0, len(sentences), batch_size)
    for start in tqdm(batches, desc="embedding", disable=not progress, leave=False):
        batch = sentences[start:start + batch_size]
        for sentence, vector in zip(batch, embed(batch)):
            vectors[sentence] = vector
    cosines = np.array([float(np.dot(vectors[p.sentence1], vectors[p.sentence2])) for p in pairs])
    return 100.0 * spearman(cosines, [p.score for p in pairs]), cosines


NLL_CHUNK_ROWS = 64  # rows widened to float64 at a time: a whole 512 x 49k window's temporaries were ~0.6 GB


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under float64 log-softmax of its logits row (row chunks: the
    same numbers, bounded temporaries)."""
    targets = np.asarray(targets)
    rows, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = np.empty(len(wanted), dtype=np.float64)
    for start in range(0, len(wanted), NLL_CHUNK_ROWS):
        chunk = rows[start:start + NLL_CHUNK_ROWS].astype(np.float64)
        peak = chunk.max(axis=-1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(chunk - peak).sum(axis=-1))
        chosen = np.take_along_axis(chunk, wanted[start:start + NLL_CHUNK_ROWS, None], axis=-1)[:, 0]
        out[start:start + NLL_CHUNK_ROWS] = log_norm - chosen
    return out.reshape(targets.shape)


def sliding_window_perplexity(token_ids: np.ndarray, logits_fn: Callable[[np.ndarray], np.ndarray],
                              window: int = 512, stride: int = 256, progress: bool = False) -> tuple[float, int]:
    """Perplexity over ``token_ids`` with overlapping windows; each token is scored once, with up to
    ``window - stride`` tokens of left context beyond the first window. Returns (ppl, tokens scored)."""
    from tqdm.auto import tqdm

    token_ids = np.asarray(token_ids, dtype=np.int64)
    total_nll, scored, previous_end = 0.0, 0, 0
    starts = list(range(0, max(len(token_ids) - 1, 1), stride))
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(start + window, len(token_ids))
        chunk = token_ids[start:end]
        new_from = max(previous_end, start + 1)  # first target position not yet scored (absolute)
        logits = logits_fn(chunk[None, :])[0]
        # logits at position i predict token i+1
        first = new_from - 1 - start
        if first < len(chunk) - 1:  # a view of the scored rows, not a copy
            total_nll += float(token_nll(logits[first:len(chunk) - 1], chunk[first + 1:]).sum())
            scored += len(chunk) - 1 - first
        previous_end = end
        if end == len(token_ids):
            break
    return float(math.exp(total_nll / max(scored, 1))), scored


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely a candidate's outputs follow a reference's (embeddings: cosine; logits: top-1)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    flat_r = reference.reshape(-1, reference.shape[-1])
    flat_c = candidate.reshape(-1, candidate.shape[-1])
    cos = (flat_r * flat_c).sum(-1) / np.clip(np.linalg.norm(flat_r, axis=-1) * np.linalg.norm(flat_c, axis=-1), 1e-12, None)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((flat_r.argmax(-1) == flat_c.argmax(-1)).mean()),
        "max_abs_diff": float(np.abs(flat_r - flat_c).max()),
    }
