"""Unstructured and semi-structured sparsity over the block matrices an adapter names.

Zeros stay in dense tensors (the export stage turns them into sparse initializers). Masks are kept so
fine-tuning can re-apply them after every optimizer step and pruned weights stay exactly zero.

Patterns
- ``unstructured``: any weight may go. ``scope=local`` removes ``fraction`` of every tensor;
  ``scope=global`` ranks all weights of all tensors together (one threshold).
- ``N:M`` (e.g. ``2:4``): at most N non-zeros in every group of M consecutive weights along the input
  dim. The fraction is implied (1 - N/M) and the scope is per group by definition.
- ``4x4``: whole 4x4 blocks are zeroed; blocks are ranked by their summed score, per tensor (local) or
  across tensors (global).

Scores are |W| (``magnitude``) or accumulated movement −W·∂L/∂W (``movement``, Sanh et al. 2020), which
needs fine-tuning data. The iterative schedule reaches the target in ``steps`` pruning steps
(cubic ramp of Zhu & Gupta 2017, or linear), optionally fine-tuning after each step (arXiv 2310.04573).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from edgeprune.core.errors import EdgePruneError

BLOCK = 4


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); None for the other patterns."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise EdgePruneError(f"N:M pattern needs 0 < N < M (got {pattern!r})")
    return n, m


def check_pattern(pattern: str, fraction: float) -> None:
    nm = parse_nm(pattern)
    if nm is None and pattern not in ("unstructured", "4x4"):
        raise EdgePruneError(f"--pattern must be unstructured, N:M (e.g. 2:4) or 4x4 (got {pattern!r})")
    if pattern == "4x4" and fraction == 0:
        raise EdgePruneError("--pattern 4x4 needs --sparsity F (the fraction of blocks to zero)")
    if nm is not None and fraction > 0 and abs(fraction - (1 - nm[0] / nm[1])) > 1e-6:
        raise EdgePruneError(f"pattern {pattern} implies sparsity {1 - nm[0] / nm[1]:g}; "
                             f"--sparsity {fraction:g} contradicts it (leave it out)")


def target_fraction(pattern: str, fraction: float) -> float:
    nm = parse_nm(pattern)
    return 1 - nm[0] / nm[1] if nm else fraction


def schedule(target: float, steps: int, kind: str = "cubic") -> list[float]:
    """Sparsity after each of ``steps`` pruning steps, ending exactly at ``target``."""
    if kind == "linear":
        return [target * (k / steps) for k in range(1, steps + 1)]
    # cubic: prune fast while many redundant weights remain, slowly near the target
    return [target * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def nm_schedule(n: int, m: int, steps: int) -> list[tuple[int, int]]:
    """N:M reached gradually by lowering N from M towards the target (e.g. 3:4 then 2:4)."""
    out = []
    for k in range(1, steps + 1):
        nk = m - int(math.floor((m - n) * k / steps + 0.5))
        out.append((min(max(nk, n), m), m))
    return out


# --- mask computation ----------------------------------------------------------------------------
def _bottom_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping all but the k lowest scores (ties broken by position, deterministically)."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:k]] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int, in_dim: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive entries along ``in_dim``.

    A trailing partial group (width not a multiple of M) also keeps at most N."""
    moved = scores.movedim(in_dim, -1)
    width = moved.shape[-1]
    pad = (-width) % m
    padded = torch.nn.functional.pad(moved, (0, pad), value=float("-inf"))
    groups = padded.reshape(*padded.shape[:-1], -1, m)
    top = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    keep = keep.reshape(*padded.shape[:-1], -1)[..., :width]
    # topk may pick a -inf pad (or an already-pruned -inf weight): those stay pruned
    keep &= torch.isfinite(moved)
    return keep.movedim(-1, in_dim).contiguous()


def block_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mean score of every 4x4 block (edge blocks may be partial)."""
    rows, cols = scores.shape
    pr, pc = (-rows) % BLOCK, (-cols) % BLOCK
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    dead = (~torch.isfinite(scores)).float()
    padded = torch.nn.functional.pad(finite, (0, pc, 0, pr))
    counts = torch.nn.functional.pad(torch.ones_like(scores), (0, pc, 0, pr))
    dead = torch.nn.functional.pad(dead, (0, pc, 0, pr))

    def blocks(t):
        return t.reshape(t.shape[0] // BLOCK, BLOCK, t.shape[1] // BLOCK, BLOCK).sum(dim=(1, 3))

    mean = blocks(padded) / blocks(counts)
    # a block that already lost a weight was pruned as a whole: keep it pruned
    return torch.where(blocks(dead) > 0, torch.full_like(mean, float("-inf")), mean)


def expand_blocks(keep_blocks: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    full = keep_blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return full[: shape[0], : shape[1]].contiguous()


def compute_masks(scores: dict[str, torch.Tensor], in_dims: dict[str, int], pattern: str, fraction: float,
                  scope: str, previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool keep-masks for ``fraction`` sparsity. Weights already masked in ``previous`` stay masked."""
    scores = {name: s.detach().float().clone() for name, s in scores.items()}
    if previous:
        for name, s in scores.items():
            if name in previous:
                s[~previous[name]] = float("-inf")
    nm = parse_nm(pattern)
    if nm is not None:
        return {name: nm_mask(s, nm[0], nm[1], in_dims[name]) for name, s in scores.items()}
    if pattern == "4x4":
        units = {name: block_scores(s) for name, s in scores.items()}
    else:
        units = scores
    if scope == "local":
        keep = {name: _bottom_k_mask(u, int(round(fraction * u.numel()))) for name, u in units.items()}
    else:
        names = list(units)
        flat = torch.cat([units[n].reshape(-1) for n in names])
        keep_flat = _bottom_k_mask(flat, int(round(fraction * flat.numel())))
        keep, offset = {}, 0
        for n in names:
            size = units[n].numel()
            keep[n] = keep_flat[offset:offset + size].view_as(units[n])
            offset += size
    if pattern == "4x4":
        keep = {name: expand_blocks(k, scores[name].shape) for name, k in keep.items()}
    return keep


# --- applying masks ------------------------------------------------------------------------------
class MaskSet:
    """Keep-masks for named parameters; ``apply()`` re-zeros pruned weights (call after every step)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]):
        self.params = params
        self.masks = masks

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            self.params[name].data.mul_(mask.to(self.params[name].dtype))

    def stats(self) -> dict:
        tensors, total, nonzero = [], 0, 0
        for name, param in self.params.items():
            nz = int(torch.count_nonzero(param.detach()))
            tensors.append({"name": name, "shape": list(param.shape), "numel": param.numel(), "nonzero": nz,
                            "sparsity": round(1 - nz / param.numel(), 6)})
            total += param.numel()
            nonzero += nz
        return {"numel": total, "nonzero": nonzero, "sparsity": round(1 - nonzero / max(total, 1), 6),
                "tensors": tensors}


def sparse_params(loaded, embeddings: bool = False) -> tuple[dict[str, torch.nn.Parameter], dict[str, int]]:
    entries = loaded.adapter.sparsifiable_weights(loaded.model)
    if embeddings:  # get_input_embeddings is the generic HF accessor: no architecture knowledge needed here
        table = loaded.model.get_input_embeddings().weight
        name = next(n for n, p in loaded.model.named_parameters() if p is table)
        entries = entries + [(name, table, 1)]  # (vocab, hidden): N:M groups run along hidden
    return {n: p for n, p, _ in entries}, {n: d for n, _, d in entries}


def magnitude_scores(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().abs().float() for name, p in params.items()}


class MovementScores:
    """Sanh et al. 2020: accumulate −W·∂L/∂W over fine-tuning steps (weights moving away from zero score
    high). Call ``update()`` after ``backward()`` and before the optimizer step."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                self.scores[name] -= (p.grad * p.data).float()
        self.updates += 1

    def reset(self) -> None:
        for s in self.scores.values():
            s.zero_()
        self.updates = 0


def sparsify(loaded, cfg, finetune_step: Callable | None = None) -> tuple[MaskSet, dict]:
    """Prune ``loaded.model`` in place per ``cfg`` (SparsityConfig); returns the masks and stats.

    ``finetune_step(masks, movement)`` runs one fine-tuning segment with the masks applied and, for
    movement scoring, accumulates scores into ``movement``; it is required for ``movement`` and
    ``finetune_each_step``."""
    from tqdm.auto import tqdm

    check_pattern(cfg.pattern, cfg.fraction)
    params, in_dims = sparse_params(loaded, cfg.embeddings)
    if not params:
        raise EdgePruneError("this model exposes no block weights to sparsify")
    movement = None
    if cfg.importance == "movement":
        if finetune_step is None:
            raise EdgePruneError("movement sparsity needs fine-tuning data (--finetune DATA)")
        movement = MovementScores(params)
    elif cfg.importance != "magnitude":
        raise EdgePruneError(f"sparsity importance must be magnitude or movement (got {cfg.importance!r})")
    nm = parse_nm(cfg.pattern)
    targets = nm_schedule(*nm, cfg.steps) if nm else schedule(cfg.fraction, cfg.steps, cfg.schedule)
    masks = MaskSet(params, {})
    history = []
    for k, target in enumerate(tqdm(targets, desc="sparsity steps", disable=cfg.steps == 1), 1):
        if movement is not None:  # scores come from how weights move while training at the current masks
            movement.reset()
            finetune_step(masks, movement)
            scores = movement.scores
        else:
            scores = magnitude_scores(params)
        pattern = f"{target[0]}:{target[1]}" if nm else cfg.pattern
        fraction = 0.0 if nm else target
        masks.masks = compute_masks(scores, in_dims, pattern, fraction, cfg.scope, masks.masks or None)
        masks.apply()
        stats = masks.stats()
        history.append({"step": k, "target": pattern if nm else round(target, 6), "sparsity": stats["sparsity"]})
        if cfg.finetune_each_step and finetune_step is not None and k < len(targets) and movement is None:
            finetune_step(masks, None)
    stats = masks.stats()
    stats.update({"pattern": cfg.pattern, "scope": "per-group" if nm else cfg.scope, "importance": cfg.importance,
                  "steps": history, "target": round(target_fraction(cfg.pattern, cfg.fraction), 6)})
    return masks, stats
