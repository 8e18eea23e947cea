"""Parameter-free stand-ins for removed sublayers (depth pruning, edgeprune/compress/depth.py), in core
because loading a depth-pruned artifact (``ArchAdapter.resize_to``) rebuilds them."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn


# --- stand-ins for removed sublayers ---------------------------------------------------------------------
class _Removed(nn.Module):
    """Parameter-free module in place of a removed sublayer's part (marked for inspection)."""

    edgeprune_removed = True


class _Identity(_Removed):
    def forward(self, x, *args, **kwargs):
        return x


class _Zero(_Removed):
    """An FFN whose output, added to the residual, changes nothing."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def _first_tensor(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "query", "x"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError("removed attention called without hidden states")


class _ZeroAttention(_Removed):
    """Attention returning (zeros, no weights): pre-LN blocks add it to the residual (llama, gpt2) or
    (DistilBERT) add it before a LayerNorm that is removed too."""

    def forward(self, *args, **kwargs):
        return torch.zeros_like(_first_tensor(args, kwargs)), None


class _PassAttention(_Removed):
    """BERT's attention module includes its residual add and LayerNorm: removed, it passes its input on."""

    def forward(self, *args, **kwargs):
        return (_first_tensor(args, kwargs),)


class _PassResidual(_Removed):
    """BERT's FFN output module: LayerNorm(dense(h) + residual) -> residual."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


BYPASS: dict[str, Callable[[], nn.Module]] = {
    "identity": _Identity, "zero": _Zero, "zero_attention": _ZeroAttention, "pass_attention": _PassAttention,
    "pass_residual": _PassResidual,
}


def is_removed(module: nn.Module) -> bool:
    return bool(getattr(module, "edgeprune_removed", False))


def bypass_sublayers(adapter, layer: nn.Module, attention: bool = False, ffn: bool = False) -> list:
    """Replace a block's attention and/or FFN children by their no-op stand-ins; returns what to restore."""
    saved = []
    for wanted, spec in ((attention, adapter.attention_bypass), (ffn, adapter.ffn_bypass)):
        if not wanted:
            continue
        for name, kind in spec.items():
            saved.append((layer, name, getattr(layer, name)))
            setattr(layer, name, BYPASS[kind]())
    return saved


def restore(saved: list) -> None:
    for layer, name, module in reversed(saved):
        setattr(layer, name, module)


@contextlib.contextmanager
def bypassed(adapter, model, blocks: Sequence[int] = (), attention: Sequence[int] = (), ffn: Sequence[int] = ()):
    """Temporarily remove blocks / sublayers (for scoring): the model computes as if they were gone."""
    layers = adapter.layers(model)
    saved = []
    try:
        for i in blocks:
            saved += bypass_sublayers(adapter, layers[i], attention=True, ffn=True)
        for i in attention:
            saved += bypass_sublayers(adapter, layers[i], attention=True)
        for i in ffn:
            saved += bypass_sublayers(adapter, layers[i], ffn=True)
        yield
    finally:
        restore(saved)


def renumber_attention(adapter, model, shapes) -> None:
    """Attention layers get contiguous ``layer_idx`` (KV-cache slots) in block order; attention-free blocks
    take none, so the first cache slot (which generation reads the past length from) is always filled."""
    slot = 0
    for layer, shape in zip(adapter.layers(model), shapes):
        if not shape.heads:
            continue
        for module in layer.modules():
            if hasattr(module, "layer_idx") and not is_removed(module):
                module.layer_idx = slot
        slot += 1
