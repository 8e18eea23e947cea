"""The whole model's mask gradients (fisher, taylor) computed block by block, for ``compress --sequential``.

The in-memory criterion backpropagates a pseudo-label loss through the whole model. The same gradients need
only one block at a time, because backpropagation is itself block by block:

* forward sweep: each block's input hidden states (every calibration batch) are written to a scratch
  directory on disk, then the block runs and is freed;
* the head: the final norm and the LM head turn the last hidden states into logits one sequence at a time,
  the pseudo-label loss (labels drawn from the model's own predictions) gives the gradient of the last
  hidden states;
* backward sweep, last block first: the block is loaded again, its stored inputs are run through it with
  per-sample multiplicative masks on its heads and FFN neurons, and the output gradient is pulled back to
  the masks (per-sample gradients: the Fisher's samples) and to the block's inputs (the previous block's
  output gradient).

So the scores are those of the in-memory ``fisher`` (up to the pseudo-labels' random draws and float
rounding), and comparable across blocks: a global or joint allocation can use them. Memory: one block, one
block's stored inputs and the output gradients of every batch (two hidden-state streams), and per block the
Fisher interaction block of its FFN neurons, which goes to disk at once (the joint search reads the rows of
the units it removes).
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeprune.core.errors import EdgePruneError

HEAD_TOKENS = 32  # tokens whose logits are computed at a time (SmolLM2: 32 x 49,152 floats, 6 MB)


class RowFile:
    """A symmetric float32 ``[n, n]`` matrix on disk, read one row at a time (``matrix[u]``) without
    mapping the file, so the rows read do not stay in the process's memory. Its diagonal is kept in memory."""

    def __init__(self, path: Path, matrix: torch.Tensor) -> None:
        self.path, self.shape = Path(path), tuple(matrix.shape)
        self._diagonal = matrix.diagonal().clone()
        _write(self.path, matrix.float().contiguous().numpy().tobytes())

    def diagonal(self) -> torch.Tensor:
        return self._diagonal

    def __getitem__(self, row: int) -> torch.Tensor:
        n = self.shape[1]
        with open(self.path, "rb") as handle:
            handle.seek(int(row) * n * 4)
            return torch.from_numpy(np.frombuffer(handle.read(n * 4), dtype=np.float32).copy())

    def materialize(self) -> torch.Tensor:
        return torch.from_numpy(np.fromfile(self.path, dtype=np.float32).reshape(self.shape))


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise EdgePruneError(f"cannot write the sequential Fisher's scratch file {path.name} in {path.parent}: "
                             f"{reason}; free space there (or set TMPDIR) and run again") from None


def _save(tensors: list[torch.Tensor], path: Path) -> None:
    try:
        torch.save([t.contiguous() for t in tensors], path)
    except (OSError, RuntimeError) as exc:
        raise EdgePruneError(f"cannot write the sequential Fisher's scratch file {path.name} in {path.parent}: "
                             f"{exc}; free space there (or set TMPDIR) and run again") from None


def _head_gradients(skeleton, weights, calib, hidden: list[torch.Tensor], dtype, generator) -> list[torch.Tensor]:
    """d(pseudo-label loss)/d(last hidden states), HEAD_TOKENS tokens at a time: a token's logits depend on
    its hidden state only, and a batch's logits would be batch x tokens x vocabulary floats, several times
    over for the softmax, the label draw and the gradient."""
    from edgeprune.compress.importance import pseudo_label_loss
    from edgeprune.compress.sequential import _set_module_tensor

    config = skeleton.config
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in weights
    norm = skeleton.model.norm
    _set_module_tensor(norm, "weight", weights.get("model.norm.weight", dtype))
    head = weights.get("model.embed_tokens.weight" if tied else "lm_head.weight", dtype)
    weights.close()
    grads = []
    try:
        for batch, states in zip(calib, hidden):
            grad = torch.empty_like(states)
            for s in range(states.shape[0]):
                for t in range(0, states.shape[1], HEAD_TOKENS):
                    h = states[s:s + 1, t:t + HEAD_TOKENS].detach().requires_grad_(True)
                    mask = batch["attention_mask"][s:s + 1, t:t + HEAD_TOKENS]
                    loss = pseudo_label_loss(norm(h) @ head.T, {"attention_mask": mask}, generator, is_logits=True)
                    (grad[s:s + 1, t:t + HEAD_TOKENS],) = torch.autograd.grad(loss, h)
                    del loss
            grads.append(grad)
    finally:
        norm.to("meta")
        del head
    return grads


def mask_gradients_sequential(loader, skeleton, adapter, weights, calib, inputs, dtype, interactions: bool,
                              scratch: Path, seed: int = 0, progress: bool = True):
    """What ``importance.mask_gradients`` returns (``(abs, sq[, gram])`` per block for heads and neurons),
    computed with one block resident at a time. ``inputs`` are the first block's calls (consumed); the
    neurons' interaction blocks come back halved (the Fisher blocks) as :class:`RowFile` s in ``scratch``."""
    from tqdm.auto import tqdm

    from edgeprune.compress.importance import UnitMasks
    from edgeprune.compress.reconstruct import _hidden, _run_layer, _with_hidden

    if not calib:
        raise EdgePruneError("gradient-based importance needs calibration batches (--calib)")
    scratch = Path(scratch)
    n_layers = len(adapter.layers(skeleton))
    hidden = [_hidden_of(call) for call in inputs]
    calls = [_with_hidden(call, None) for call in inputs]  # what every block is given besides the hidden states
    del inputs
    with torch.no_grad():
        for index in tqdm(range(n_layers), desc="sequential fisher: forward", disable=not progress, leave=False):
            _save(hidden, scratch / f"input-{index:05d}.pt")
            layer = loader.load(index)
            hidden = _run_layer(layer, [_with_hidden(call, h) for h, call in zip(hidden, calls)])
            loader.free(index)
    generator = torch.Generator().manual_seed(seed)
    grads = _head_gradients(skeleton, weights, calib, hidden, dtype, generator)
    del hidden
    shapes = adapter.dense_shapes(skeleton.config)
    abs_h, sq_h, abs_n, sq_n = ([None] * n_layers for _ in range(4))
    gram_h, gram_n = ([None] * n_layers, [None] * n_layers) if interactions else (None, None)
    masks = UnitMasks(skeleton, adapter)
    for index in tqdm(reversed(range(n_layers)), total=n_layers, desc="sequential fisher: backward",
                      disable=not progress, leave=False):
        stored = torch.load(scratch / f"input-{index:05d}.pt", weights_only=True)
        (scratch / f"input-{index:05d}.pt").unlink()
        layer = loader.load(index)
        shape = shapes[index]
        totals = [torch.zeros(shape.heads), torch.zeros(shape.heads), torch.zeros(shape.ffn), torch.zeros(shape.ffn)]
        grams = [torch.zeros(shape.heads, shape.heads), torch.zeros(shape.ffn, shape.ffn)] if interactions else None
        with masks:
            for b, (x, call) in enumerate(zip(stored, calls)):
                masks.reset(x.shape[0])
                x = x.detach().requires_grad_(index > 0)
                args, kwargs = _with_hidden(call, x)
                out = _hidden(layer(*args, **kwargs))
                wanted = [masks.heads[index], masks.neurons[index]] + ([x] if index > 0 else [])
                got = torch.autograd.grad(out, wanted, grad_outputs=grads[b].to(out.dtype))
                gh, gn = got[0].detach().float(), got[1].detach().float()
                totals[0] += gh.abs().sum(0)
                totals[1] += gh.pow(2).sum(0)
                totals[2] += gn.abs().sum(0)
                totals[3] += gn.pow(2).sum(0)
                if interactions:
                    grams[0] += gh.T @ gh
                    grams[1] += gn.T @ gn
                grads[b] = got[2].detach() if index > 0 else None  # the previous block's output gradient
                del out, got, x
        del stored
        loader.free(index)
        abs_h[index], sq_h[index], abs_n[index], sq_n[index] = totals
        if interactions:
            gram_h[index] = grams[0]
            # halved here (the Fisher's 1/2 g g^T, as sequential_scores halves the rest), then only on disk
            gram_n[index] = RowFile(scratch / f"neuron-fisher-{index:05d}.f32", grams[1].div_(2))
            del grams
    if interactions:
        return (abs_h, abs_n), (sq_h, sq_n), (gram_h, gram_n)
    return (abs_h, abs_n), (sq_h, sq_n)


def _hidden_of(call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def scratch_directory(out: Path):
    """A temporary directory beside the output (the same disk the user chose; removed when done)."""
    parent = Path(out).resolve().parent
    return tempfile.TemporaryDirectory(prefix=".edgeprune-fisher-", dir=parent if parent.is_dir() else None)


def sequential_scores(loader, skeleton, adapter, weights, calib, inputs, dtype, importance: str,
                      interactions: bool, scratch: Path, seed: int, progress: bool):
    """``Scores`` of the in-memory ``fisher`` / ``taylor`` criteria, block by block."""
    from edgeprune.compress.importance import Scores, _kv_scores

    result = mask_gradients_sequential(loader, skeleton, adapter, weights, calib, inputs, dtype, interactions,
                                       scratch, seed, progress)
    (abs_h, abs_n), (sq_h, sq_n) = result[0], result[1]
    heads, neurons = (abs_h, abs_n) if importance == "taylor" else ([h / 2 for h in sq_h], [n / 2 for n in sq_n])
    shapes = adapter.dense_shapes(skeleton.config)
    scores = Scores(list(heads), [_kv_scores(adapter, s, h) for s, h in zip(shapes, heads)], list(neurons),
                    comparable=True)
    if interactions:
        gram_h, gram_n = result[2]
        scores.head_interactions = [g / 2 for g in gram_h]
        scores.neuron_interactions = gram_n  # already halved: written as the Fisher blocks
    return scores
