"""Importance criteria: small callables ``(model, adapter, calib) -> Scores``, registered by name.

Higher score = more important = kept. Calibrated criteria (taylor/fisher, activation, movement) register
here too and receive a list of tokenized calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from edgeprune.core.arch.base import KV, Q, ArchAdapter, LayerShape, unit_sq_norms
from edgeprune.core.errors import EdgePruneError


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer, one score per query head
    kv_heads: list[torch.Tensor]  # per layer, one score per KV head (equal to heads without GQA)
    neurons: list[torch.Tensor]  # per layer, one score per FFN neuron
    # True when scores of different layers (and heads vs neurons) are in the same units (e.g. loss change),
    # so a global allocator may rank them directly; otherwise it normalises per layer first.
    comparable: bool = False
    # Optional per-layer interaction matrices [units, units] whose diagonal equals the scores (the Fisher's
    # within-layer block); mask rearrangement uses them to pick units that are jointly, not only singly, cheap.
    head_interactions: list[torch.Tensor] | None = None
    neuron_interactions: list[torch.Tensor] | None = None


class Importance(Protocol):
    def __call__(self, model: torch.nn.Module, adapter: ArchAdapter, calib: Sequence[dict] | None) -> Scores: ...


_IMPORTANCE: dict[str, Callable[..., Scores]] = {}
# Criteria that need calibration batches; the orchestrator checks this before loading data.
NEEDS_CALIBRATION: set[str] = set()
# Cap on the memory the per-layer Fisher blocks may take (joint allocation, rearrangement): a 7B Llama
# (32 layers x 11008^2 neurons) would need ~43 GiB; MiniLM needs 0.16 GiB, SmolLM2-135M 0.8 GiB.
MAX_INTERACTION_BYTES = 8 * 2**30


def register_importance(name: str, needs_calibration: bool = False):
    def decorator(fn):
        _IMPORTANCE[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn
    return decorator


def get_importance(name: str) -> Callable[..., Scores]:
    try:
        return _IMPORTANCE[name]
    except KeyError:
        raise EdgePruneError(f"unknown importance {name!r}; available: {', '.join(available_importance())}") from None


def available_importance() -> list[str]:
    return sorted(_IMPORTANCE)


def layer_unit_sizes(adapter: ArchAdapter, model, index: int):
    shape = adapter.shapes(model.config)[index]
    head_dim = adapter.head_dim(model.config)
    sizes = {Q: shape.heads, KV: shape.kv_heads, "ffn": shape.ffn}
    widths = {Q: head_dim, KV: head_dim, "ffn": 1}
    return shape, sizes, widths


@register_importance("magnitude")
@torch.no_grad()
def magnitude(model, adapter: ArchAdapter, calib=None) -> Scores:
    """L2 norm of all weights that belong to a unit (producer rows plus consumer columns)."""
    per_layer = [magnitude_layer(model, adapter, index) for index in range(len(adapter.layers(model)))]
    return Scores(*(list(column) for column in zip(*per_layer)))


@torch.no_grad()
def magnitude_layer(model, adapter: ArchAdapter, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heads, KV heads, neurons) magnitude scores of one layer (the sequential path scores block by block)."""
    shape, sizes, widths = layer_unit_sizes(adapter, model, index)
    attn, ffn = adapter.unit_slices(model, index)
    totals = {Q: torch.zeros(shape.heads), KV: torch.zeros(shape.kv_heads), "ffn": torch.zeros(shape.ffn)}
    for spec in attn + ffn:
        if spec.name != "weight":
            continue
        for kind, value in unit_sq_norms(spec, sizes, widths).items():
            totals[kind] += value
    if shape.kv_heads == shape.heads:  # MHA: q and kv are the same unit
        totals[Q] = totals[Q] + totals[KV]
        totals[KV] = totals[Q].clone()
    return totals[Q].sqrt(), totals[KV].sqrt(), totals["ffn"].sqrt()


# --- calibrated criteria ------------------------------------------------------------------------------
class UnitMasks:
    """Per-head and per-neuron multiplicative masks, applied by forward pre-hooks on each layer's unit
    consumers (attention output projection, FFN down projection). Masks are ``[batch, units]`` when
    ``batch`` is given, so one backward pass yields per-sample gradients (needed for the Fisher)."""

    def __init__(self, model, adapter: ArchAdapter):
        self.model, self.adapter = model, adapter
        self.head_dim = adapter.head_dim(model.config)
        self.shapes = adapter.shapes(model.config)
        self.heads: list[torch.Tensor] = []
        self.neurons: list[torch.Tensor] = []
        self._handles = []

    def reset(self, batch: int | None = None, requires_grad: bool = True) -> None:
        lead = () if batch is None else (batch,)
        self.heads = [torch.ones(*lead, s.heads, requires_grad=requires_grad) for s in self.shapes]
        self.neurons = [torch.ones(*lead, s.ffn, requires_grad=requires_grad) for s in self.shapes]

    def _hook(self, index: int, heads: bool):
        # Reads self.heads/self.neurons at call time, so reset() between batches needs no re-hooking.
        def pre_hook(module, args):
            mask = self.heads[index] if heads else self.neurons[index]
            if heads:
                mask = mask.repeat_interleave(self.head_dim, dim=-1)
            x = args[0]
            if mask.dim() == 2:  # per-sample masks: [batch, features] -> broadcast over tokens
                mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
            return (x * mask.to(x.dtype),) + tuple(args[1:])
        return pre_hook

    def __enter__(self):
        if not self.heads:
            self.reset()
        for index in range(len(self.shapes)):
            attn_out, ffn_out = self.adapter.unit_consumers(self.model, index)
            self._handles.append(attn_out.module.register_forward_pre_hook(self._hook(index, True)))
            self._handles.append(ffn_out.module.register_forward_pre_hook(self._hook(index, False)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def model_output(model, batch: dict) -> tuple[torch.Tensor, bool]:
    """(logits, True) for LM/classifier heads, else (last hidden state, False)."""
    import inspect

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    out = model(**batch, **extra)
    logits = getattr(out, "logits", None)
    return (logits, True) if logits is not None else (out.last_hidden_state, False)


def pseudo_label_loss(output: torch.Tensor, batch: dict, generator: torch.Generator, is_logits: bool) -> torch.Tensor:
    """Summed over samples, a loss whose per-sample gradient squared is an unbiased Fisher sample.

    Logits: cross-entropy against labels drawn from the model's own predictive distribution (the true
    Fisher, no labels needed). Hidden states: every real token's last hidden state under a unit-variance
    Gaussian model, i.e. ``sum_t z_t . h_t`` with ``z_t ~ N(0, I)``, whose squared gradient estimates
    diag(J^T J) -- the curvature of a hidden-state distillation MSE at the dense model. (Scoring the
    mean-pooled sentence embedding instead ranked units worse on MiniLM/STS-B: docs/quality-structured.md.)
    """
    mask = batch["attention_mask"]
    if is_logits:
        logp = torch.log_softmax(output.float(), dim=-1)
        with torch.no_grad():
            labels = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
        nll = -logp.reshape(-1, logp.shape[-1]).gather(1, labels).view(logp.shape[:-1])
        if nll.dim() == 2:  # token-level (LM): ignore padding
            nll = nll * mask.to(nll.dtype)
        return nll.sum()
    hidden = output.float() * mask.unsqueeze(-1).to(torch.float32)  # padding contributes nothing
    z = torch.randn(hidden.shape, generator=generator)
    return (hidden * z).sum()


def mask_gradients(model, adapter: ArchAdapter, calib, draws: int = 1, seed: int = 0, interactions: bool = False):
    """Per-sample gradients of the pseudo-label loss w.r.t. head and neuron masks, reduced two ways.

    Returns ``(sum of |g|, sum of g^2)`` per layer for heads and neurons, summed over samples and draws;
    with ``interactions`` a third item: per-layer sums of g g^T (heads, neurons), the Fisher's layer blocks.
    """
    from tqdm.auto import tqdm

    if not calib:
        raise EdgePruneError("gradient-based importance needs calibration batches (--calib)")
    generator = torch.Generator().manual_seed(seed)
    masks = UnitMasks(model, adapter)
    n_layers = len(masks.shapes)
    abs_h = [torch.zeros(s.heads) for s in masks.shapes]
    sq_h = [torch.zeros(s.heads) for s in masks.shapes]
    abs_n = [torch.zeros(s.ffn) for s in masks.shapes]
    sq_n = [torch.zeros(s.ffn) for s in masks.shapes]
    gram_h = [torch.zeros(s.heads, s.heads) for s in masks.shapes] if interactions else None
    gram_n = [torch.zeros(s.ffn, s.ffn) for s in masks.shapes] if interactions else None
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # only mask gradients are wanted; skip weight-gradient work
    try:
        with masks:
            for batch in tqdm(calib, desc="mask gradients", leave=False):
                for _ in range(draws):
                    masks.reset(batch["input_ids"].shape[0])
                    output, is_logits = model_output(model, batch)
                    loss = pseudo_label_loss(output, batch, generator, is_logits)
                    grads = torch.autograd.grad(loss, masks.heads + masks.neurons)
                    for i in range(n_layers):
                        gh, gn = grads[i].detach(), grads[n_layers + i].detach()
                        abs_h[i] += gh.abs().sum(0)
                        sq_h[i] += gh.pow(2).sum(0)
                        abs_n[i] += gn.abs().sum(0)
                        sq_n[i] += gn.pow(2).sum(0)
                        if interactions:
                            gram_h[i] += gh.T @ gh
                            gram_n[i] += gn.T @ gn
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    if interactions:
        return (abs_h, abs_n), (sq_h, sq_n), (gram_h, gram_n)
    return (abs_h, abs_n), (sq_h, sq_n)


def _kv_scores(adapter: ArchAdapter, shape: LayerShape, heads: torch.Tensor) -> torch.Tensor:
    """A KV head's score: the sum over the query heads that read it (all of them go with it)."""
    if shape.kv_heads == shape.heads:
        return heads.clone()
    return heads.view(shape.kv_heads, -1).sum(1)


def _scores_from(adapter, model, heads, neurons, comparable: bool) -> Scores:
    shapes = adapter.shapes(model.config)
    kv = [_kv_scores(adapter, s, h) for s, h in zip(shapes, heads)]
    return Scores(list(heads), kv, list(neurons), comparable=comparable)


@register_importance("fisher", needs_calibration=True)
def fisher(model, adapter: ArchAdapter, calib=None, interactions: bool = False) -> Scores:
    """Diagonal Fisher information of each head/neuron mask (Michel et al. 2019; Kwon et al. 2022):
    the sum over calibration samples of the squared per-sample mask gradient. Half of it approximates
    the loss increase when that unit is removed, so scores compare across layers and unit kinds.
    ``interactions`` also keeps each layer's full Fisher block (units x units; memory grows with the
    square of the FFN width) for mask rearrangement."""
    if not interactions:
        _, (heads, neurons) = mask_gradients(model, adapter, calib)
        return _scores_from(adapter, model, [h / 2 for h in heads], [n / 2 for n in neurons], comparable=True)
    # float32 blocks here, float64 copies in the joint search: ~12 bytes per entry at peak
    shapes = adapter.shapes(model.config)
    entries = sum(s.heads ** 2 + s.ffn ** 2 for s in shapes)
    if entries * 12 > MAX_INTERACTION_BYTES:
        raise EdgePruneError(f"per-layer Fisher blocks would need ~{entries * 12 / 2**30:.1f} GiB "
                             f"(FFN width {max(s.ffn for s in shapes)}); use --allocation "
                             "global without --rearrange for a model this wide")
    _, (heads, neurons), (gram_h, gram_n) = mask_gradients(model, adapter, calib, interactions=True)
    scores = _scores_from(adapter, model, [h / 2 for h in heads], [n / 2 for n in neurons], comparable=True)
    scores.head_interactions = [g / 2 for g in gram_h]
    scores.neuron_interactions = [g / 2 for g in gram_n]
    return scores


@register_importance("taylor", needs_calibration=True)
def taylor(model, adapter: ArchAdapter, calib=None) -> Scores:
    """First-order Taylor saliency |mask * dL/dmask| (mask = 1), summed over samples per sample."""
    (heads, neurons), _ = mask_gradients(model, adapter, calib)
    return _scores_from(adapter, model, heads, neurons, comparable=True)


@register_importance("activation", needs_calibration=True)
@torch.no_grad()
def activation(model, adapter: ArchAdapter, calib=None) -> Scores:
    """Output-norm contribution: the L2 norm, over calibration tokens, of what each head / neuron adds
    to its consumer's output (``W[:, unit] @ x[unit]``); padding tokens are ignored."""
    from tqdm.auto import tqdm

    if not calib:
        raise EdgePruneError("activation importance needs calibration batches (--calib)")
    shapes = adapter.shapes(model.config)
    head_dim = adapter.head_dim(model.config)
    heads = [torch.zeros(s.heads) for s in shapes]
    neurons = [torch.zeros(s.ffn) for s in shapes]
    handles, current = [], {}

    def weight_in_last(spec) -> torch.Tensor:  # [out_features, in_features] whatever the storage
        return spec.tensor.detach().float().movedim(spec.dim, -1)

    def make_hook(index: int, spec, kind: str):
        def hook(module, args):
            x = args[0].detach().float()
            keep = current["mask"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[keep] if x.shape[:-1].numel() == keep.numel() else x.reshape(-1, x.shape[-1])
            weight = weight_in_last(spec)
            if kind == "heads":
                n = x.shape[-1] // head_dim
                xh = x.view(-1, n, head_dim)
                wh = weight.view(weight.shape[0], n, head_dim)
                contrib = torch.einsum("tnd,ond->tno", xh, wh)
                heads[index] += contrib.pow(2).sum((0, 2))
            else:
                neurons[index] += x.pow(2).sum(0) * weight.pow(2).sum(0)
        return hook

    for index in range(len(shapes)):
        attn_out, ffn_out = adapter.unit_consumers(model, index)
        handles.append(attn_out.module.register_forward_pre_hook(make_hook(index, attn_out, "heads")))
        handles.append(ffn_out.module.register_forward_pre_hook(make_hook(index, ffn_out, "neurons")))
    try:
        for batch in tqdm(calib, desc="activation", leave=False):
            current["mask"] = batch["attention_mask"]
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return _scores_from(adapter, model, [h.sqrt() for h in heads], [n.sqrt() for n in neurons], comparable=False)


# --- movement (Sanh et al. 2020) ------------------------------------------------------------------
def _unit_sums(values: torch.Tensor, spec, sizes: dict, widths: dict) -> dict[str, torch.Tensor]:
    """Signed sum of ``values`` (shaped like ``spec.tensor``) over each unit's entries, by unit kind."""
    if spec.dim >= values.dim():
        return {}
    moved = values.movedim(spec.dim, 0)
    out, offset = {}, 0
    for kind in spec.segments:
        length = sizes[kind] * widths[kind]
        out[kind] = out.get(kind, 0) + moved[offset:offset + length].reshape(sizes[kind], -1).sum(1)
        offset += length
    return out


@register_importance("movement", needs_calibration=True)
def movement(model, adapter: ArchAdapter, calib=None, learning_rate: float = 2e-5) -> Scores:
    """Movement per head/neuron: −W·∂L/∂W accumulated while fine-tuning on the calibration batches with a
    label-free loss (LM loss for decoders, SimCSE for encoders), summed over each unit's weights. Units whose
    weights move away from zero score high. The weights are restored afterwards: scoring has no side effect."""
    from tqdm.auto import tqdm

    from edgeprune.compress.finetune import unsupervised_loss

    if not calib:
        raise EdgePruneError("importance 'movement' needs calibration data: pass --calib PATH")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = range(len(adapter.layers(model)))
    specs = [[s for s in sum(adapter.unit_slices(model, i), []) if s.name == "weight"] for i in layers]
    acc = {id(s.tensor): torch.zeros_like(s.tensor, dtype=torch.float32) for layer in specs for s in layer}
    weights = {id(s.tensor): s.tensor for layer in specs for s in layer}
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()  # encoders: dropout makes SimCSE's two views
    try:
        for batch in tqdm(calib, desc="movement", leave=False):
            optimizer.zero_grad(set_to_none=True)
            unsupervised_loss(model, adapter, batch).backward()
            with torch.no_grad():
                for key, weight in weights.items():
                    if weight.grad is not None:
                        acc[key] -= (weight.grad * weight).float()
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.eval()
    heads, kv_heads, neurons = [], [], []
    for index in layers:
        shape, sizes, widths = layer_unit_sizes(adapter, model, index)
        totals = {Q: torch.zeros(shape.heads), KV: torch.zeros(shape.kv_heads), "ffn": torch.zeros(shape.ffn)}
        for spec in specs[index]:
            for kind, value in _unit_sums(acc[id(spec.tensor)], spec, sizes, widths).items():
                totals[kind] += value
        if shape.kv_heads == shape.heads:  # MHA: q and kv are the same unit
            totals[Q] = totals[Q] + totals[KV]
            totals[KV] = totals[Q].clone()
        heads.append(totals[Q])
        kv_heads.append(totals[KV])
        neurons.append(totals["ffn"])
    return Scores(heads, kv_heads, neurons)


from edgeprune.compress import flap as _flap  # noqa: E402,F401  (registers "flap")
