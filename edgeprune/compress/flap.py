"""FLAP's fluctuation importance (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning"), forward only.

A unit's consumer input channel j (attention output projection for heads, FFN down projection for neurons)
is scored by how much its activation *varies* over calibration tokens times the squared norm of the weight
column that reads it: ``var_t(x_j) * ||W[:, j]||^2``. A channel that is nearly constant carries little
information beyond its mean, which a bias could put back. Heads sum their ``head_dim`` channels.

Only per-channel first and second moments are needed, so the statistics of one block come from one forward
pass over that block's cached inputs: the criterion the sequential (block-by-block) path is made for. The
same code scores the whole model in memory (``--importance flap``), so both paths choose the same units.
"""

from __future__ import annotations

import torch

from edgeprune.compress.importance import _scores_from, register_importance
from edgeprune.core.errors import EdgePruneError


class ChannelMoments:
    """Per-channel count, sum and sum of squares of a module's input over real (unpadded) tokens."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == x.shape[0]:
            x = x[mask.reshape(-1).bool()]
        x = x.double()
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.squares = torch.zeros(x.shape[1], dtype=torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += x.pow(2).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel (FLAP's fluctuation)."""
        mean = self.total / self.count
        return ((self.squares - self.count * mean.pow(2)) / max(self.count - 1, 1)).clamp_min(0)


def moment_hooks(consumers, masks: dict) -> tuple[list, list[ChannelMoments]]:
    """Forward pre-hooks on a layer's (attention, FFN) consumers collecting their input moments; ``masks``
    holds the current batch's attention mask under "mask". Returns (handles, [attention, ffn] moments)."""
    moments = [ChannelMoments(), ChannelMoments()]

    def make(slot):
        def hook(module, args):
            moments[slot].add(args[0], masks.get("mask"))
        return hook

    handles = [spec.module.register_forward_pre_hook(make(slot)) for slot, spec in enumerate(consumers)]
    return handles, moments


def layer_scores(consumers, moments: list[ChannelMoments], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head, per FFN neuron) fluctuation scores of one layer from its consumer input moments."""
    out = []
    for spec, moment in zip(consumers, moments):
        weight = spec.tensor.detach().float().movedim(spec.dim, -1)  # [out_features, in_features]
        out.append(moment.variance * weight.double().pow(2).sum(0))
    heads = out[0].view(-1, head_dim).sum(1)
    return heads.float(), out[1].float()


@register_importance("flap", needs_calibration=True)
@torch.no_grad()
def flap(model, adapter, calib=None):
    """Whole-model FLAP fluctuation scores (one forward pass per calibration batch)."""
    from tqdm.auto import tqdm

    if not calib:
        raise EdgePruneError("flap importance needs calibration batches (--calib)")
    masks: dict = {}
    handles, per_layer = [], []
    for index in range(len(adapter.layers(model))):
        layer_handles, moments = moment_hooks(adapter.unit_consumers(model, index), masks)
        handles += layer_handles
        per_layer.append(moments)
    try:
        for batch in tqdm(calib, desc="flap", leave=False):
            masks["mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    head_dim = adapter.head_dim(model.config)
    scores = [layer_scores(adapter.unit_consumers(model, i), m, head_dim) for i, m in enumerate(per_layer)]
    return _scores_from(adapter, model, [s[0] for s in scores], [s[1] for s in scores], comparable=False)
