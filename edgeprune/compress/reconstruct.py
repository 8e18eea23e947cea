"""Post-training reconstruction: re-fit each layer's kept output projections by ridge least squares.

After structured pruning, the attention output projection and the FFN down projection of every layer see
fewer inputs (kept heads / neurons). Layer by layer, in order, we feed the *pruned* model's own inputs to
layer i (so earlier errors are compensated instead of compounding), and solve for the consumer weights
(and bias) that make its output match the *dense* model's output of the same module on the same
calibration tokens:

    min_W ||X_p W^T - Y_dense||^2 + lambda ||W - W_0||^2      (X_p with a ones column for the bias)

The ridge pulls toward the current weights, so too little data can only make the fit conservative.
The attention projection is re-fitted first, then the FFN projection sees the corrected attention output.
Gram matrices are accumulated per batch, so memory stays O(width^2) per module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edgeprune.core.arch.base import ArchAdapter, ParamSlice
from edgeprune.core.errors import EdgePruneError


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (we only wanted the inputs of layer 0)."""


@dataclass
class _Normal:
    gram: torch.Tensor  # [d+1, d+1] of [X, 1]
    cross: torch.Tensor  # [d+1, out]
    target_sq: float
    tokens: int


def _token_mask(batch: dict, shape) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(shape[:-1]):
        return torch.ones(shape[:-1], dtype=torch.bool)
    return mask.bool()


def capture_layer_inputs(model, adapter: ArchAdapter, calib: Sequence[dict]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that the model passes to its first transformer layer, per calibration batch."""
    import inspect

    first = adapter.layers(model)[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        for batch in calib:
            try:
                model(**batch, **extra)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same layer call with new hidden states (passed positionally or as ``hidden_states=``)."""
    args, kwargs = call
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


def _weight_out_in(spec: ParamSlice) -> torch.Tensor:
    """The consumer weight as [out_features, in_features] (Conv1D stores it transposed)."""
    return spec.tensor.detach().movedim(spec.dim, -1)


def _current_params(spec: ParamSlice) -> torch.Tensor:
    """[out, in+1]: weight with the bias (or zeros) as the last column."""
    weight = _weight_out_in(spec).double()
    bias = getattr(spec.module, "bias", None)
    bias = bias.detach().double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    return torch.cat([weight, bias[:, None]], dim=1)


def _error(params: torch.Tensor, normal: _Normal) -> float:
    """Mean squared error per token of X W^T - Y, from the accumulated normal equations."""
    quad = ((params @ normal.gram) * params).sum()
    lin = (params * normal.cross.T).sum()
    return float((quad - 2 * lin + normal.target_sq) / max(normal.tokens, 1))


def _solve(normal: _Normal, current: torch.Tensor, damping: float, has_bias: bool, fit_bias: bool = True) -> torch.Tensor:
    d = normal.gram.shape[0] - 1
    ridge = damping * float(normal.gram.diagonal()[:d].mean().clamp_min(1e-12))
    reg = torch.full((d + 1,), ridge, dtype=torch.float64)
    if has_bias and fit_bias:
        reg[d] = 0.0  # the bias is cheap to fit and should absorb mean shifts freely
    elif has_bias:
        reg[d] = 1e12 * max(ridge, 1.0)  # effectively pinned to its current value
    gram = normal.gram + torch.diag(reg)
    rhs = normal.cross + reg[:, None] * current.T
    if not has_bias:  # no bias parameter: pin that column to zero
        gram, rhs = gram[:d, :d], rhs[:d]
    solution = torch.linalg.solve(gram, rhs).T
    if not has_bias:
        solution = torch.cat([solution, torch.zeros(solution.shape[0], 1, dtype=solution.dtype)], dim=1)
    return solution


def _solve_scales(normal: _Normal, current: torch.Tensor, width: int, damping: float) -> torch.Tensor:
    """Kwon et al.'s mask tuning: keep the weights' directions, re-fit one scale per unit (head of
    ``width`` columns, or neuron) by ridge least squares toward 1; the bias stays as it is.

    With contributions c_u = W[:, u] x[u], the normal equations are built from the same Gram matrix:
    G_s[u, v] = sum_{i in u, j in v} G[i, j] (W^T W)[i, j] and r_u = sum_{i in u} W[:, i] . (C[i] - G[i, 1] b).
    """
    d = normal.gram.shape[0] - 1
    weight, bias = current[:, :d], current[:, d]
    units = d // width
    pair = normal.gram[:d, :d] * (weight.T @ weight)
    gram_s = pair.view(units, width, units, width).sum((1, 3))
    resid_cross = normal.cross[:d] - normal.gram[:d, d:d + 1] * bias[None, :]
    r = (weight.T * resid_cross).sum(1).view(units, width).sum(1)
    ridge = damping * float(gram_s.diagonal().mean().clamp_min(1e-12))
    scales = torch.linalg.solve(gram_s + ridge * torch.eye(units, dtype=gram_s.dtype), r + ridge)
    return torch.cat([weight * scales.repeat_interleave(width)[None, :], bias[:, None]], dim=1)


@torch.no_grad()
def _set_params(spec: ParamSlice, params: torch.Tensor) -> None:
    weight = spec.tensor
    new = params[:, :-1].to(weight.dtype).movedim(-1, spec.dim)
    weight.data.copy_(new.reshape(weight.shape))
    bias = getattr(spec.module, "bias", None)
    if bias is not None:
        bias.data.copy_(params[:, -1].to(bias.dtype))


def _run_layer(layer, inputs, hooks: dict | None = None):
    """Run ``layer`` on every cached batch input; ``hooks`` maps module -> forward hook (removed after)."""
    handles = [m.register_forward_hook(h) for m, h in (hooks or {}).items()]
    try:
        outputs = []
        for args, kwargs in inputs:
            outputs.append(_hidden(layer(*args, **kwargs)))
        return outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def dense_targets(layer_d, consumers_d, inputs_d, calib: Sequence[dict], dtype=torch.float64):
    """Run the dense layer on its own inputs: the consumer outputs on real tokens (the re-fit targets, per
    consumer slot and batch, kept in ``dtype``) and the layer outputs (the next layer's dense inputs)."""
    targets: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    batch_no = {"i": 0}

    def target_hook(slot):
        def hook(module, args, output):
            keep = _token_mask(calib[batch_no["i"]], output.shape)
            targets[slot].append(output.detach()[keep].to(dtype))
        return hook

    handles = [consumers_d[slot].module.register_forward_hook(target_hook(slot)) for slot in (0, 1)]
    next_d = []
    try:
        for i, (args, kwargs) in enumerate(inputs_d):
            batch_no["i"] = i
            next_d.append(_hidden(layer_d(*args, **kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    return targets, next_d


@torch.no_grad()
def fit_layer(layer_p, consumers_p, inputs_p, targets, calib: Sequence[dict], damping: float, mode: str,
              fit_bias: bool, head_dim: int) -> dict:
    """Re-fit the pruned layer's two consumers (attention output, then FFN output) in place to ``targets``
    from the layer's own inputs ``inputs_p``. Returns the errors before/after."""
    entry = {}
    for slot, name in ((0, "attention"), (1, "ffn")):
        spec = consumers_p[slot]
        normal = None
        for i, (args, kwargs) in enumerate(inputs_p):
            seen = {}

            def input_hook(module, hook_args):
                seen["x"] = hook_args[0].detach()
                raise _Stop

            handle = spec.module.register_forward_pre_hook(input_hook)
            try:
                layer_p(*args, **kwargs)
            except _Stop:
                pass
            finally:
                handle.remove()
            x = seen["x"]
            keep = _token_mask(calib[i], x.shape)
            x = x[keep].double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            y = targets[slot][i].double()
            if normal is None:
                normal = _Normal(x.T @ x, x.T @ y, float(y.pow(2).sum()), x.shape[0])
            else:
                normal.gram += x.T @ x
                normal.cross += x.T @ y
                normal.target_sq += float(y.pow(2).sum())
                normal.tokens += x.shape[0]
        targets[slot] = None  # no longer needed: free it before the next solve
        current = _current_params(spec)
        has_bias = getattr(spec.module, "bias", None) is not None
        if mode == "scales":
            solution = _solve_scales(normal, current, head_dim if slot == 0 else 1, damping)
        else:
            solution = _solve(normal, current, damping, has_bias, fit_bias)
        before, after = _error(current, normal), _error(solution, normal)
        if after < before:  # guard against numerically bad solves: never make a layer worse
            _set_params(spec, solution)
        else:
            after = before
        scale = max(normal.target_sq / max(normal.tokens, 1), 1e-30)
        entry[name] = {"mse_before": before, "mse_after": after,
                       "rel_before": before / scale, "rel_after": after / scale}
    return entry


@torch.no_grad()
def reconstruct(model, dense_model, adapter: ArchAdapter, calib: Sequence[dict], damping: float = 1e-2,
                mode: str = "full", fit_bias: bool = True, progress: bool = True) -> list[dict]:
    """Re-fit every layer's attention-output and FFN-output projections of ``model`` (pruned, in place)
    to reproduce ``dense_model``'s outputs of the same modules. Returns per-layer errors before/after
    (mean squared error per calibration token, and relative to the target's mean square)."""
    from tqdm.auto import tqdm

    if not calib:
        raise EdgePruneError("--reconstruct needs calibration data: pass --calib PATH")
    was_training = (model.training, dense_model.training)
    model.eval()
    dense_model.eval()
    inputs_p = capture_layer_inputs(model, adapter, calib)
    inputs_d = capture_layer_inputs(dense_model, adapter, calib)
    layers_p, layers_d = adapter.layers(model), adapter.layers(dense_model)
    head_dim = adapter.head_dim(model.config)
    report = []
    for index in tqdm(range(len(layers_p)), desc="reconstruct", disable=not progress, leave=False):
        targets, next_d = dense_targets(layers_d[index], adapter.unit_consumers(dense_model, index), inputs_d, calib)
        entry = fit_layer(layers_p[index], adapter.unit_consumers(model, index), inputs_p, targets, calib,
                          damping, mode, fit_bias, head_dim)
        report.append(dict(layer=index, **entry))
        inputs_p = [_with_hidden(call, out) for out, call in zip(_run_layer(layers_p[index], inputs_p), inputs_p)]
        inputs_d = [_with_hidden(call, out) for out, call in zip(next_d, inputs_d)]
    model.train(was_training[0])
    dense_model.train(was_training[1])
    return report
