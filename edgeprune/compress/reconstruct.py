"""Post-training reconstruction: re-fit each layer's kept output projections by ridge least squares.

After structured pruning, the attention output projection and the FFN down projection of every layer see
fewer inputs (kept heads / neurons). Layer by layer, in order, we feed the *pruned* model's own inputs to
layer i (so earlier errors are compensated instead of compounding), and solve for the consumer weights
(and bias) that make its output match the *dense* model's output of the same module on the same
calibration tokens:

    min_W ||X_p W^T - Y_dense||^2 + lambda ||W - W_0||^2      (X_p with a ones column for the bias)

The ridge pulls toward the current weights, so too little data can only make the fit conservative.
The attention projection is re-fitted first, then the FFN projection sees the corrected attention output.
Gram matrices are accumulated per batch (``refit_block``), so memory stays O(width^2) per module plus
one cached stream of FFN targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edgeprune.compress.lazy_weights import release_memory
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
    weight = _weight_out_in(spec)
    params = torch.zeros(weight.shape[0], weight.shape[1] + 1, dtype=torch.float64)  # one float64 copy
    params[:, :-1] = weight
    bias = getattr(spec.module, "bias", None)
    if bias is not None:
        params[:, -1] = bias.detach()
    return params


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
    rhs = normal.cross + reg[:, None] * current.T
    # The ridge goes onto the Gram matrix in place and comes off exactly (its diagonal saved): at
    # d = 8192 each [d+1, d+1] float64 copy is 537 MB, and the solve's factorisation is one already.
    diagonal = normal.gram.diagonal().clone()
    normal.gram.diagonal().add_(reg)
    try:
        if has_bias:
            solution = torch.linalg.solve(normal.gram, rhs).T
        else:  # no bias parameter: pin that column to zero
            solution = torch.linalg.solve(normal.gram[:d, :d], rhs[:d]).T
            solution = torch.cat([solution, torch.zeros(solution.shape[0], 1, dtype=solution.dtype)], dim=1)
    finally:
        normal.gram.diagonal().copy_(diagonal)
    return solution


def _fit_scales(normal: _Normal, current: torch.Tensor, width: int, damping: float) -> tuple[torch.Tensor, float, float]:
    """Kwon et al.'s mask tuning: keep the weights' directions, re-fit one scale per unit (head of
    ``width`` columns, or neuron) by ridge least squares toward 1; the bias stays as it is.
    Returns (parameters, error before, error after). Consumes ``normal``: its Gram matrix and cross terms are
    released as the units' equations are built (for neurons in the Gram matrix's own memory), and those
    are factorised in place: one [d, d] float64 matrix at a time (537 MB at d = 8192), not three.

    With contributions c_u = W[:, u] x[u], everything is in the units' space: the error of scales s is
    (s^T A s - 2 r^T s + const) / tokens, A[u, v] = sum_{i in u, j in v} G[i, j] (W^T W)[i, j],
    r_u = sum_{i in u} W[:, i] . (C[i] - G[i, d] b), const = b.b G[d, d] - 2 b.C[d] + sum Y^2
    (the same value as the error of [W diag(s), b] from the full normal equations); s = 1 is the weight as it is.
    """
    gram = normal.gram
    normal.gram = None
    d = gram.shape[0] - 1
    weight, bias = current[:, :d], current[:, d]
    units = d // width
    resid_cross = torch.einsum("oi,io->i", weight, normal.cross[:d]) - gram[:d, d] * (bias @ weight)
    r = resid_cross.view(units, width).sum(1)
    const = float(bias @ bias) * float(gram[d, d]) - 2 * float(bias @ normal.cross[d]) + normal.target_sq
    normal.cross = None
    rows = max(1, 256 // width)  # units per chunk: one [chunk, d] temporary, not a [d, d] one
    if width == 1:  # A is G[:d, :d] * W^T W: built in G's own memory, then packed to a contiguous [d, d]
        for start in range(0, d, rows):
            stop = min(d, start + rows)
            gram[start:stop, :d].mul_(weight[:, start:stop].T @ weight)
        unit_gram = _pack_leading_block(gram)
    else:
        unit_gram = torch.empty(units, units, dtype=torch.float64)
        for start in range(0, units, rows):
            cols = slice(start * width, min(units, start + rows) * width)
            block = (weight[:, cols].T @ weight).mul_(gram[cols, :d])
            unit_gram[start:start + rows] = block.view(-1, width, units, width).sum((1, 3))
    del gram
    tokens = max(normal.tokens, 1)
    before = float(unit_gram.sum() - 2 * r.sum() + const) / tokens
    ridge = damping * float(unit_gram.diagonal().mean().clamp_min(1e-12))
    unit_gram.diagonal().add_(ridge)
    scales = _solve_positive_in_place(unit_gram, r + ridge)
    if scales is None:  # not numerically positive definite: keep the weights as they are
        return current, before, before
    # (A + ridge I) s = r + ridge 1 gives s^T A s without A (factorised in place above)
    after = float(ridge * (scales.sum() - scales @ scales) - r @ scales + const) / tokens
    return torch.cat([weight * scales.repeat_interleave(width)[None, :], bias[:, None]], dim=1), before, after


def _pack_leading_block(square: torch.Tensor) -> torch.Tensor:
    """``square[:-1, :-1]`` as a contiguous matrix in ``square``'s own memory (rows moved down in place;
    numpy copies overlapping slices correctly); ``square`` is overwritten."""
    n = square.shape[0] - 1
    flat = square.view(-1).numpy()
    for i in range(1, n):
        flat[i * n:(i + 1) * n] = flat[i * (n + 1):i * (n + 1) + n]
    return square.view(-1)[:n * n].view(n, n)


def _solve_positive_in_place(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite float64 ``matrix``, overwriting it with
    its Cholesky factor (LAPACK through scipy): torch's solvers factorise a copy, another [d, d] matrix.
    None when the factorisation fails (not positive definite in floating point)."""
    from scipy.linalg import lapack

    assert matrix.dtype == torch.float64 and matrix.is_contiguous()
    column_major = matrix.numpy().T  # the same memory; symmetric, so the same matrix
    factor, info = lapack.dpotrf(column_major, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        return None
    solution, info = lapack.dpotrs(factor, rhs.numpy(), lower=0)
    return torch.from_numpy(solution) if info == 0 else None


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


def _accumulate(normal: _Normal | None, x: torch.Tensor, y: torch.Tensor) -> _Normal:
    """Add one batch's (consumer inputs ``x`` [tokens, d], targets ``y`` [tokens, out]) to the normal
    equations of [x, 1]: the sums over batches equal those of all batches' activations concatenated."""
    x_one = torch.ones(x.shape[0], x.shape[1] + 1, dtype=torch.float64)  # one float64 copy of x, not two
    x_one[:, :-1] = x
    x = x_one
    y = y.double()
    if normal is None:
        return _Normal(x.T @ x, x.T @ y, float(y.pow(2).sum()), x.shape[0])
    normal.gram.addmm_(x.T, x)  # in place: no second [d+1, d+1] temporary
    normal.cross.addmm_(x.T, y)
    normal.target_sq += float(y.pow(2).sum())
    normal.tokens += x.shape[0]
    return normal


def _consumer_input(layer, module, call) -> torch.Tensor:
    """``module``'s input when ``layer`` runs on one cached call; the forward stops there."""
    args, kwargs = call
    seen = {}

    def hook(_module, hook_args):
        seen["x"] = hook_args[0].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        layer(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


def _fit_consumer(spec: ParamSlice, normal: _Normal, mode: str, damping: float, fit_bias: bool, width: int) -> dict:
    """Solve one consumer's re-fit from its normal equations (the scale fit consumes them) and set it,
    unless it would be worse."""
    current = _current_params(spec)
    has_bias = getattr(spec.module, "bias", None) is not None
    if mode == "scales":
        solution, before, after = _fit_scales(normal, current, width, damping)
    else:
        solution = _solve(normal, current, damping, has_bias, fit_bias)
        before, after = _error(current, normal), _error(solution, normal)
    if after < before:  # guard against numerically bad solves: never make a layer worse
        _set_params(spec, solution)
    else:
        after = before
    scale = max(normal.target_sq / max(normal.tokens, 1), 1e-30)
    return {"mse_before": before, "mse_after": after, "rel_before": before / scale, "rel_after": after / scale}


@torch.no_grad()
def refit_block(layer_d, consumers_d, inputs_d: list, inputs_p: list, calib: Sequence[dict], attention_input,
                pruned, damping: float, mode: str, fit_bias: bool, head_dim: int, advance: bool = True) -> dict:
    """Re-fit one pruned block's two consumers (attention output, then FFN output) to the dense block's
    outputs of the same modules, accumulating the normal equations batch by batch.

    * Dense sweep, per batch: the dense block on its own input gives both targets and its output, which
      replaces ``inputs_d[i]`` (the next block's dense input) in place; ``attention_input(i, call)`` gives
      the pruned block's attention-consumer input on ``inputs_p[i]``, added to the attention's equations at
      once. Only the FFN targets are kept (one tensor of the size of a cached stream): the FFN must be
      fitted on inputs that pass through the re-fitted attention, which needs the attention solve first.
    * ``pruned()`` then returns (pruned layer, its consumers) (the sequential path prunes the block in place
      here); the attention is solved and set.
    * FFN sweep: the pruned block's FFN-consumer inputs with their kept targets, each freed once added.
    * With ``advance``, the pruned block's outputs replace ``inputs_p[i]`` in place.

    The result equals the re-fit from all batches' activations at once (tests/compress/test_reconstruct.py).
    """
    ffn_targets: list = []
    normal = None
    slot_out: dict = {}

    def target_hook(slot):
        def hook(module, args, output):
            slot_out[slot] = output.detach()
        return hook

    handles = [consumers_d[slot].module.register_forward_hook(target_hook(slot)) for slot in (0, 1)]
    try:
        for i, (args, kwargs) in enumerate(inputs_d):
            inputs_d[i] = _with_hidden((args, kwargs), _hidden(layer_d(*args, **kwargs)))
            keep = _token_mask(calib[i], slot_out[0].shape)
            ffn_targets.append(slot_out[1][keep].float())  # float32 holds fp32 / bf16 outputs exactly
            y0 = slot_out[0][keep]
            slot_out.clear()
            x0 = attention_input(i, inputs_p[i])
            normal = _accumulate(normal, x0[_token_mask(calib[i], x0.shape)], y0)
            del x0, y0
    finally:
        for handle in handles:
            handle.remove()
    # the dense sweep's activations were freed into the heap: hand those pages back before the solves
    release_memory(collect=False)
    layer_p, consumers_p = pruned()
    entry = {"attention": _fit_consumer(consumers_p[0], normal, mode, damping, fit_bias, head_dim)}
    normal = None
    for i, call in enumerate(inputs_p):
        x1 = _consumer_input(layer_p, consumers_p[1].module, call)
        normal = _accumulate(normal, x1[_token_mask(calib[i], x1.shape)], ffn_targets[i])
        ffn_targets[i] = None  # freed as it is used
        del x1
    release_memory(collect=False)
    entry["ffn"] = _fit_consumer(consumers_p[1], normal, mode, damping, fit_bias, 1)
    del normal
    if advance:
        for i, (args, kwargs) in enumerate(inputs_p):
            inputs_p[i] = _with_hidden((args, kwargs), _hidden(layer_p(*args, **kwargs)))
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
        layer_p, consumers_p = layers_p[index], adapter.unit_consumers(model, index)
        attention_input = lambda i, call, layer=layer_p, spec=consumers_p[0]: _consumer_input(layer, spec.module, call)
        entry = refit_block(layers_d[index], adapter.unit_consumers(dense_model, index), inputs_d, inputs_p, calib,
                            attention_input, lambda pair=(layer_p, consumers_p): pair, damping, mode, fit_bias,
                            head_dim, advance=index + 1 < len(layers_p))
        report.append(dict(layer=index, **entry))
    model.train(was_training[0])
    dense_model.train(was_training[1])
    return report
