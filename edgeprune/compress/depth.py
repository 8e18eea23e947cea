"""Depth pruning: remove whole transformer blocks, or only the attention or only the FFN sublayer of a block.

Block importance (higher = kept):
- ``bi``: Block Influence (ShortGPT, Men et al. 2024): mean over calibration tokens of 1 - cos(block input,
  block output); a sublayer's BI compares the residual stream before and after that sublayer.
- ``ppl``: the calibration perplexity with the block removed (Shortened LLaMA, Kim et al. 2024); encoders,
  which have no perplexity, use the mean cosine distance of the pooled embedding to the unpruned model's.
  ``ppl-iterative`` removes the cheapest block, re-scores the rest, and repeats.
- ``taylor``: sum over the block's weights of |dL/dW * W| on the calibration loss (Shortened LLaMA).

Removal is physical: dropped blocks leave the ``ModuleList`` and ``num_hidden_layers`` shrinks; a dropped
sublayer is replaced by a parameter-free stand-in that leaves the residual stream unchanged, and its layer's
stored shape says so (0 heads and KV heads: attention-free; FFN width 0: FFN-free), which is what
``edgeprune.load`` rebuilds and the GGUF exporter writes as llama.cpp ``deci`` layers. Attention layers are
renumbered contiguously (``layer_idx``), so an attention-free layer takes no KV-cache slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError

DEPTH_IMPORTANCE = ("bi", "ppl", "ppl-iterative", "taylor")
UNITS = ("block", "attention", "ffn")
# the CLI flag of each field, for error lines
FLAG = {"layers": "--layers", "drop_layers": "--drop-layers", "attn_layers": "--attn-layers",
        "drop_attn": "--drop-attn", "ffn_layers": "--ffn-layers", "drop_ffn": "--drop-ffn"}


@dataclass(frozen=True)
class DepthConfig(FrozenConfig):
    """Which blocks / sublayers to remove: a fraction chosen by ``importance``, or explicit block indices."""

    layers: float = 0.0  # fraction of blocks to remove
    drop_layers: tuple[int, ...] = ()
    attn_layers: float = 0.0  # fraction of the model's blocks whose attention sublayer is removed
    drop_attn: tuple[int, ...] = ()
    ffn_layers: float = 0.0  # fraction of the model's blocks whose FFN sublayer is removed
    drop_ffn: tuple[int, ...] = ()
    importance: str = "bi"  # block criterion: bi | ppl | ppl-iterative | taylor
    sublayer_importance: str | None = None  # attention / FFN criterion; None: the block criterion

    def __post_init__(self):
        for fraction, listed in (("layers", "drop_layers"), ("attn_layers", "drop_attn"), ("ffn_layers", "drop_ffn")):
            value, indices = getattr(self, fraction), getattr(self, listed)
            if not 0.0 <= value < 1.0:
                raise EdgePruneError(f"{FLAG[fraction]} must be in [0, 1): the fraction of blocks to remove "
                                     f"(got {value})")
            if value and indices:
                raise EdgePruneError(f"give {FLAG[fraction]} F or {FLAG[listed]} i,j,... , not both")
            bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
            if bad:
                raise EdgePruneError(f"{FLAG[listed]}: block indices are integers >= 0 (got {bad[0]!r})")
            repeated = sorted({i for i in indices if indices.count(i) > 1})
            if repeated:
                raise EdgePruneError(f"{FLAG[listed]} names block {repeated[0]} more than once")
        for name in ("importance", "sublayer_importance"):
            value = getattr(self, name)
            if value is not None and value not in DEPTH_IMPORTANCE:
                raise EdgePruneError(f"depth importance must be one of {', '.join(DEPTH_IMPORTANCE)} (got {value!r})")
        both = sorted(set(self.drop_attn) & set(self.drop_ffn))
        if both:
            raise EdgePruneError(f"block {both[0]} is in --drop-attn and --drop-ffn: that is the whole block; "
                                 f"use --drop-layers {both[0]}")
        for listed in ("drop_attn", "drop_ffn"):
            overlap = sorted(set(self.drop_layers) & set(getattr(self, listed)))
            if overlap:
                raise EdgePruneError(f"block {overlap[0]} is in --drop-layers and {FLAG[listed]}; name it once")

    @property
    def active(self) -> bool:
        return bool(self.layers or self.drop_layers or self.attn_layers or self.drop_attn or self.ffn_layers
                    or self.drop_ffn)

    @property
    def needs_calibration(self) -> bool:
        """Explicit indices need no data; fractions are chosen by a calibrated criterion."""
        return bool(self.layers or self.attn_layers or self.ffn_layers)

    def criterion(self, unit: str) -> str:
        return self.importance if unit == "block" else (self.sublayer_importance or self.importance)


@dataclass
class DepthPlan:
    """Blocks and sublayers removed, by their index in the model the plan was made for."""

    dense_layers: int
    drop_blocks: tuple[int, ...] = ()
    drop_attention: tuple[int, ...] = ()
    drop_ffn: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def kept_blocks(self) -> list[int]:
        return [i for i in range(self.dense_layers) if i not in self.drop_blocks]

    def to_dict(self) -> dict:
        return {"dense_layers": self.dense_layers, "drop_blocks": list(self.drop_blocks),
                "drop_attention": list(self.drop_attention), "drop_ffn": list(self.drop_ffn),
                "kept_blocks": self.kept_blocks, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> "DepthPlan":
        return cls(int(data["dense_layers"]), tuple(data.get("drop_blocks", ())), tuple(data.get("drop_attention", ())),
                   tuple(data.get("drop_ffn", ())), data.get("meta", {}))


# stand-ins for removed sublayers live in core (loading rebuilds them)
from edgeprune.core.arch.standins import (BYPASS, _first_tensor, bypass_sublayers, bypassed, is_removed,  # noqa: E402,F401
                                          renumber_attention, restore)


def _blocks_owner(adapter, model) -> tuple[nn.Module, str]:
    owner = model.base_model
    *path, name = adapter.blocks_path.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


# --- checks -----------------------------------------------------------------------------------------------
def count_for(fraction: float, total: int) -> int:
    return int(math.floor(fraction * total + 0.5))


def check_depth(cfg: DepthConfig, adapter, model_config) -> None:
    """Refuse, before any scoring, what the model cannot take: indices out of range, a fraction that removes
    every block (or none), families whose computation depends on the block index."""
    n = adapter.num_layers(model_config)
    last = f"the model has {n} blocks (0-{n - 1})"
    for listed in ("drop_layers", "drop_attn", "drop_ffn"):
        outside = [i for i in getattr(cfg, listed) if i >= n]
        if outside:
            raise EdgePruneError(f"{FLAG[listed]} names block {outside[0]}, but {last}")
    removed = len(cfg.drop_layers) if cfg.drop_layers else count_for(cfg.layers, n)
    if removed >= n:
        what = f"{FLAG['drop_layers']} {','.join(map(str, cfg.drop_layers))}" if cfg.drop_layers \
            else f"{FLAG['layers']} {cfg.layers}"
        raise EdgePruneError(f"{what} removes all {n} blocks; keep at least one"
                             + ("" if cfg.drop_layers else f" (F < {(n - 0.5) / n:.3f})"))
    for fraction in ("layers", "attn_layers", "ffn_layers"):
        value = getattr(cfg, fraction)
        if value and count_for(value, n) == 0:
            raise EdgePruneError(f"{FLAG[fraction]} {value} removes nothing from {n} blocks "
                                 f"(the smallest step is {1 / n:.3f})")
    free = n - removed
    for fraction, listed in (("attn_layers", "drop_attn"), ("ffn_layers", "drop_ffn")):
        want = len(getattr(cfg, listed)) or count_for(getattr(cfg, fraction), n)
        if want > free:
            raise EdgePruneError(f"{FLAG[fraction]}/{FLAG[listed]}: {want} sublayers asked for, but only {free} "
                                 "blocks remain after the whole-block removal")
    if getattr(model_config, "scale_attn_by_inverse_layer_idx", False):
        raise EdgePruneError("depth pruning: this GPT-2 scales attention by its block index "
                             "(scale_attn_by_inverse_layer_idx), which removing blocks would change")
    types = getattr(model_config, "layer_types", None)
    if (cfg.attn_layers or cfg.drop_attn) and types and len(set(types)) > 1:
        raise EdgePruneError(f"attention removal: the blocks mix attention kinds ({', '.join(sorted(set(types)))}), "
                             "whose KV-cache slots would shift; drop whole blocks instead")


# --- scoring -----------------------------------------------------------------------------------------------
def _hidden_of(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def block_influence(model, adapter, calib) -> dict[str, torch.Tensor]:
    """Per block: BI of the block, of its attention sublayer and of its FFN sublayer (1 - cosine of the
    residual stream before and after, averaged over real tokens)."""
    from tqdm.auto import tqdm

    layers = adapter.layers(model)
    n = len(layers)
    seen = {"in": [None] * n, "mid": [None] * n, "out": [None] * n}
    handles = []

    def keep(kind, index):
        def pre_hook(module, args, kwargs):
            seen[kind][index] = _first_tensor(args, kwargs).detach()
        def post_hook(module, args, kwargs, output):
            seen[kind][index] = _hidden_of(output).detach()
        return pre_hook, post_hook

    child, side = adapter.mid_residual
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(keep("in", i)[0], with_kwargs=True))
        handles.append(layer.register_forward_hook(keep("out", i)[1], with_kwargs=True))
        pre, post = keep("mid", i)
        mid = getattr(layer, child)
        handles.append(mid.register_forward_pre_hook(pre, with_kwargs=True) if side == "input"
                       else mid.register_forward_hook(post, with_kwargs=True))
    totals = {unit: torch.zeros(n, dtype=torch.float64) for unit in UNITS}
    tokens = 0

    def distance(a, b, mask):
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        return ((1 - cos) * mask).sum().double()

    try:
        for batch in tqdm(calib, desc="block influence", leave=False):
            model(**batch)
            mask = batch["attention_mask"].to(torch.float32)
            tokens += int(mask.sum())
            for i in range(n):
                a, m, b = seen["in"][i], seen["mid"][i], seen["out"][i]
                totals["block"][i] += distance(a, b, mask)
                totals["attention"][i] += distance(a, m, mask)
                totals["ffn"][i] += distance(m, b, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {unit: (value / max(tokens, 1)).float() for unit, value in totals.items()}


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@torch.no_grad()
def calibration_loss(model, adapter, calib, reference: list[torch.Tensor] | None = None) -> float:
    """Decoders: perplexity of the calibration tokens. Encoders: mean cosine distance of the pooled
    embeddings to ``reference`` (the unpruned model's)."""
    from edgeprune.compress.importance import model_output

    total, count = 0.0, 0
    for b, batch in enumerate(calib):
        output, is_logits = model_output(model, batch)
        mask = batch["attention_mask"]
        if adapter.is_decoder:
            logp = torch.log_softmax(output[:, :-1].float(), dim=-1)
            target = batch["input_ids"][:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            valid = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
            total += float((nll * valid).sum())
            count += int(valid.sum())
        else:
            pooled = _mean_pool(output.float(), mask)
            total += float((1 - torch.nn.functional.cosine_similarity(pooled, reference[b], dim=-1)).sum())
            count += pooled.shape[0]
    mean = total / max(count, 1)
    return math.exp(mean) if adapter.is_decoder else mean


@torch.no_grad()
def _pooled_reference(model, adapter, calib) -> list[torch.Tensor] | None:
    from edgeprune.compress.importance import model_output

    if adapter.is_decoder:
        return None
    return [_mean_pool(model_output(model, batch)[0].float(), batch["attention_mask"]) for batch in calib]


def _sublayer_parameters(adapter, layer) -> dict[str, list[nn.Parameter]]:
    params = {}
    for unit, spec in (("attention", adapter.attention_bypass), ("ffn", adapter.ffn_bypass)):
        params[unit] = [p for name in spec for p in getattr(layer, name).parameters()]
    return params


def taylor_scores(model, adapter, calib, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sum of |dL/dW * W| over each block's / sublayer's weights, the gradient summed over calibration
    (decoders: LM loss; encoders: a random projection of the last hidden states, as the unit criteria do)."""
    from tqdm.auto import tqdm

    from edgeprune.compress.importance import model_output, pseudo_label_loss

    layers = adapter.layers(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for batch in tqdm(calib, desc="taylor (blocks)", leave=False):
            output, is_logits = model_output(model, batch)
            if adapter.is_decoder and is_logits:
                logp = torch.log_softmax(output[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
                loss = (nll * batch["attention_mask"][:, 1:].to(nll.dtype)).sum()
            else:
                loss = pseudo_label_loss(output, batch, generator, is_logits)
            loss.backward()
        scores = {unit: torch.zeros(len(layers)) for unit in UNITS}
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for unit, params in _sublayer_parameters(adapter, layer).items():
                    scores[unit][i] = sum(float((p.grad * p).abs().sum()) for p in params if p.grad is not None)
            scores["block"] = scores["attention"] + scores["ffn"]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def _removal_losses(model, adapter, calib, unit: str, candidates: Sequence[int], removed: dict,
                    reference) -> dict[int, float]:
    """Calibration loss with each candidate removed on top of ``removed`` (blocks/attention/ffn lists)."""
    from tqdm.auto import tqdm

    losses = {}
    for i in tqdm(candidates, desc=f"ppl without each {unit}", leave=False):
        extra = {"blocks": [], "attention": [], "ffn": []}
        extra["blocks" if unit == "block" else unit] = [i]
        with bypassed(adapter, model, removed["blocks"] + extra["blocks"], removed["attention"] + extra["attention"],
                      removed["ffn"] + extra["ffn"]):
            losses[i] = calibration_loss(model, adapter, calib, reference)
    return losses


def select(model, adapter, calib, criterion: str, unit: str, candidates: Sequence[int], count: int,
           removed: dict, seed: int = 0) -> tuple[list[int], dict]:
    """The ``count`` least important of ``candidates`` under ``criterion`` (with ``removed`` already gone),
    and the scores that chose them."""
    if not calib:
        raise EdgePruneError(f"depth importance {criterion!r} needs calibration data (--calib DATA), or name the "
                             "blocks with --drop-layers / --drop-attn / --drop-ffn")
    candidates = list(candidates)
    with bypassed(adapter, model, removed["blocks"], removed["attention"], removed["ffn"]):
        if criterion == "bi":
            scores = block_influence(model, adapter, calib)[unit]
        elif criterion == "taylor":
            scores = taylor_scores(model, adapter, calib, seed)[unit]
        else:
            scores = None
        reference = _pooled_reference(model, adapter, calib) if criterion.startswith("ppl") else None
    if scores is not None:
        values = {i: float(scores[i]) for i in candidates}
        chosen = sorted(sorted(candidates, key=lambda i: (values[i], i))[:count])
        return chosen, {"criterion": criterion, "scores": values}
    if criterion == "ppl":
        base = calibration_loss(model, adapter, calib, reference) if adapter.is_decoder else 0.0
        values = _removal_losses(model, adapter, calib, unit, candidates, removed, reference)
        chosen = sorted(sorted(candidates, key=lambda i: (values[i], i))[:count])
        return chosen, {"criterion": criterion, "scores": values, "base": base}
    # iterative: remove the cheapest, re-score the rest with it gone
    chosen, steps = [], []
    state = {k: list(v) for k, v in removed.items()}
    key = "blocks" if unit == "block" else unit
    for _ in range(count):
        rest = [i for i in candidates if i not in chosen]
        values = _removal_losses(model, adapter, calib, unit, rest, state, reference)
        best = min(rest, key=lambda i: (values[i], i))
        chosen.append(best)
        state[key].append(best)
        steps.append({"removed": best, "loss": values[best], "scores": values})
    return sorted(chosen), {"criterion": criterion, "steps": steps, "order": chosen}


def plan_depth(model, adapter, cfg: DepthConfig, calib=None, seed: int = 0) -> DepthPlan:
    """Whole blocks first; then attention sublayers among the remaining blocks, then FFN sublayers among the
    blocks that still have attention, each scored with what was chosen before already removed."""
    check_depth(cfg, adapter, model.config)
    n = len(adapter.layers(model))
    removed = {"blocks": [], "attention": [], "ffn": []}
    meta = {}
    steps = (("block", "layers", "drop_layers", "blocks"), ("attention", "attn_layers", "drop_attn", "attention"),
             ("ffn", "ffn_layers", "drop_ffn", "ffn"))
    for unit, fraction, listed, key in steps:
        indices = list(getattr(cfg, listed))
        if getattr(cfg, fraction):
            taken = set(removed["blocks"]) | set(removed["attention"]) | set(removed["ffn"])
            candidates = [i for i in range(n) if i not in taken]
            indices, scored = select(model, adapter, calib, cfg.criterion(unit), unit, candidates,
                                     count_for(getattr(cfg, fraction), n), removed, seed)
            meta[unit] = scored
        removed[key] = sorted(indices)
    return DepthPlan(n, tuple(removed["blocks"]), tuple(removed["attention"]), tuple(removed["ffn"]), meta)


# --- surgery ------------------------------------------------------------------------------------------------
def apply_depth(model, adapter, plan: DepthPlan) -> None:
    """Remove the plan's sublayers and blocks in place; record the kept shapes and, in the config, which of
    the source's blocks remain (``edgeprune_depth``, composed over repeated compressions)."""
    from edgeprune.core.arch.base import LayerShape
    from edgeprune.compress.surgery import record_shapes

    layers = adapter.layers(model)
    if len(layers) != plan.dense_layers:
        raise EdgePruneError(f"depth plan for {plan.dense_layers} blocks, the model has {len(layers)}")
    shapes = list(adapter.shapes(model.config))
    for i in plan.drop_attention:
        bypass_sublayers(adapter, layers[i], attention=True)
        shapes[i] = LayerShape(0, 0, shapes[i].ffn)
    for i in plan.drop_ffn:
        bypass_sublayers(adapter, layers[i], ffn=True)
        shapes[i] = LayerShape(shapes[i].heads, shapes[i].kv_heads, 0)
    keep = plan.kept_blocks
    owner, name = _blocks_owner(adapter, model)
    setattr(owner, name, nn.ModuleList([layers[i] for i in keep]))
    config = model.config
    config.num_hidden_layers = len(keep)
    if hasattr(owner, "n_layers"):  # DistilBERT's Transformer keeps its own count
        owner.n_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    previous = getattr(config, "edgeprune_depth", None) or {}
    source = previous.get("kept_blocks") or list(range(plan.dense_layers))
    config.edgeprune_depth = {"source_layers": previous.get("source_layers", plan.dense_layers),
                              "kept_blocks": [source[i] for i in keep]}
    record_shapes(model, [shapes[i] for i in keep])
    renumber_attention(adapter, model, adapter.shapes(config))


def describe(plan: DepthPlan) -> str:
    parts = []
    if plan.drop_blocks:
        parts.append(f"blocks {','.join(map(str, plan.drop_blocks))}")
    if plan.drop_attention:
        parts.append(f"attention of {','.join(map(str, plan.drop_attention))}")
    if plan.drop_ffn:
        parts.append(f"FFN of {','.join(map(str, plan.drop_ffn))}")
    return "removed " + "; ".join(parts) if parts else "nothing removed"
