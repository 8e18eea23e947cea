"""What every architecture adapter provides, and the generic slicing machinery they share.

An adapter describes a family declaratively: where the transformer layers are, which parameters carry a
head (and along which dimension), which carry an FFN neuron, and which attributes must follow a new head
count. Everything else (importance, plans, surgery, reload) is written once against this description.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

# Roles of a sliced parameter: "in" params produce a head's/neuron's activations (rows of q/k/v, fc1),
# "out" params consume them (columns of the attention output projection, fc2). Masking a unit to zero
# only needs the "out" side.
IN, OUT = "in", "out"
# Which unit indexes a segment: a query head, or a key/value head (same thing without GQA).
Q, KV = "q", "kv"


@dataclass(frozen=True)
class LayerShape:
    heads: int  # query heads
    kv_heads: int
    ffn: int  # FFN neurons (intermediate width)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParamSlice:
    """One parameter sliced by heads or neurons: ``module.<name>`` along ``dim``.

    ``segments`` lists the unit kind of each consecutive block along ``dim``; a fused GPT-2 ``c_attn``
    is ``(Q, KV, KV)``, a plain ``q_proj`` is ``(Q,)``. FFN params use ``("ffn",)``.
    """

    module: nn.Module
    name: str
    dim: int
    segments: tuple[str, ...]
    role: str

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass(frozen=True)
class LayerPlan:
    keep_heads: tuple[int, ...]  # query head indices, group-major order
    keep_kv_heads: tuple[int, ...]
    keep_neurons: tuple[int, ...]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        return cls(tuple(data["keep_heads"]), tuple(data["keep_kv_heads"]), tuple(data["keep_neurons"]))

    @property
    def shape(self) -> LayerShape:
        return LayerShape(len(self.keep_heads), len(self.keep_kv_heads), len(self.keep_neurons))


def _unit_rows(keep: Sequence[int], width: int) -> torch.Tensor:
    keep_t = torch.as_tensor(list(keep), dtype=torch.long)
    return (keep_t[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _sliced(tensor: torch.Tensor, spec: ParamSlice, keeps: dict[str, Sequence[int]],
            sizes: dict[str, int], widths: dict[str, int]) -> torch.Tensor:
    dim = spec.dim if spec.dim >= 0 else tensor.dim() + spec.dim
    if dim >= tensor.dim():  # biases of Linear "out" params are not sliced
        return tensor
    pieces, offset = [], 0
    for kind in spec.segments:
        length = sizes[kind] * widths[kind]
        rows = _unit_rows(keeps[kind], widths[kind]) + offset
        pieces.append(tensor.index_select(dim, rows))
        offset += length
    if offset != tensor.shape[dim]:
        raise RuntimeError(f"{spec.name}: expected {offset} along dim {dim}, found {tuple(tensor.shape)}")
    return torch.cat(pieces, dim=dim).contiguous()


def kept_rows(spec: ParamSlice, plan: LayerPlan, shape: LayerShape, head_dim: int) -> torch.Tensor:
    """The indices along ``spec``'s sliced dim that ``prune_layer`` keeps, in the order ``_sliced`` puts them:
    e.g. the attention output projection's kept input channels, to slice a dense block's activations."""
    keeps = {Q: plan.keep_heads, KV: plan.keep_kv_heads, "ffn": plan.keep_neurons}
    sizes = {Q: shape.heads, KV: shape.kv_heads, "ffn": shape.ffn}
    widths = {Q: head_dim, KV: head_dim, "ffn": 1}
    pieces, offset = [], 0
    for kind in spec.segments:
        pieces.append(_unit_rows(keeps[kind], widths[kind]) + offset)
        offset += sizes[kind] * widths[kind]
    return torch.cat(pieces)


class ArchAdapter:
    """Base class. Subclasses set the class attributes and implement the ``*_slices`` hooks."""

    model_types: tuple[str, ...] = ()
    is_decoder: bool = False
    # Declarative block anatomy for analytic parameter and FLOP counts (independent of the modules).
    ffn_matrices: int = 2  # fc1+fc2, or gate+up+down = 3
    norm_vectors_per_block: int = 4  # two LayerNorms with weight and bias; two RMSNorms have 2
    # Depth pruning (edgeprune/compress/depth.py): the block's children that make up its attention and its
    # FFN sublayer, each with the stand-in that makes the sublayer a no-op on the residual stream
    # ("identity", "zero", "zero_attention", "pass_attention", "pass_residual"; see sublayers.BYPASS), and
    # where the residual stream between the two sublayers can be read: (child, "input" | "output").
    attention_bypass: dict[str, str] = {}
    ffn_bypass: dict[str, str] = {}
    mid_residual: tuple[str, str] = ("", "")
    # the attribute of ``model.base_model`` (dotted) that holds the blocks
    blocks_path: str = "layers"

    def qkv_bias(self, config) -> bool:
        return True

    def out_bias(self, config) -> bool:
        return True

    def ffn_bias(self, config) -> bool:
        return True

    def block_params(self, config, shape: LayerShape) -> int:
        """Parameters of one block; a sublayer removed by depth pruning (0 heads, or FFN width 0) takes its
        norm and biases with it."""
        hidden, hd = self.hidden_size(config), self.head_dim(config)
        q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
        params = hidden * (q_width + 2 * kv_width) + q_width * hidden
        if self.qkv_bias(config):
            params += q_width + 2 * kv_width
        if self.out_bias(config) and shape.heads:
            params += hidden
        params += self.ffn_matrices * hidden * shape.ffn
        if self.ffn_bias(config) and shape.ffn:
            params += (self.ffn_matrices - 1) * shape.ffn + hidden
        sublayers = (shape.heads > 0) + (shape.ffn > 0)
        return params + self.norm_vectors_per_block // 2 * sublayers * hidden

    def block_flops(self, config, shape: LayerShape, seq_len: int) -> int:
        """FLOPs (2 per multiply-add) of one block over a full sequence of ``seq_len`` tokens."""
        hidden, hd = self.hidden_size(config), self.head_dim(config)
        q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
        matmul = hidden * (q_width + 2 * kv_width) + q_width * hidden + self.ffn_matrices * hidden * shape.ffn
        attention = 2 * seq_len * q_width  # QK^T and attention x V, per token
        return 2 * seq_len * (matmul + attention)

    # --- structure -------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def num_layers(self, config) -> int:
        return config.num_hidden_layers

    def head_dim(self, config) -> int:
        return config.hidden_size // config.num_attention_heads

    def hidden_size(self, config) -> int:
        return config.hidden_size

    def dense_shapes(self, config) -> list[LayerShape]:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        ffn = config.intermediate_size
        return [LayerShape(heads, kv, ffn) for _ in range(self.num_layers(config))]

    def shapes(self, config) -> list[LayerShape]:
        """Per-layer shapes as stored in the config (pruned) or the dense ones."""
        stored = getattr(config, "edgeprune_layers", None)
        if stored:
            return [LayerShape(**entry) for entry in stored]
        return self.dense_shapes(config)

    def attention_slices(self, layer: nn.Module) -> list[ParamSlice]:
        raise NotImplementedError

    def ffn_slices(self, layer: nn.Module) -> list[ParamSlice]:
        raise NotImplementedError

    def set_attention_shape(self, layer: nn.Module, shape: LayerShape, head_dim: int) -> None:
        """Update the attributes the attention forward reads (head counts, widths)."""
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------------------------
    def group_size(self, shape: LayerShape) -> int:
        return shape.heads // shape.kv_heads

    def kv_group_of(self, head: int, shape: LayerShape) -> int:
        return head // self.group_size(shape)

    def validate_plan(self, layer_plan: LayerPlan, shape: LayerShape, index: int) -> None:
        heads, kv, neurons = layer_plan.keep_heads, layer_plan.keep_kv_heads, layer_plan.keep_neurons
        if not heads or not neurons:
            raise ValueError(f"layer {index}: a plan must keep at least one head and one FFN neuron")
        if len(set(heads)) != len(heads) or len(set(neurons)) != len(neurons) or len(set(kv)) != len(kv):
            raise ValueError(f"layer {index}: duplicate indices in plan")
        if max(heads) >= shape.heads or max(neurons) >= shape.ffn or (kv and max(kv) >= shape.kv_heads):
            raise ValueError(f"layer {index}: plan index out of range for shape {shape}")
        groups = [self.kv_group_of(h, shape) for h in heads]
        if shape.kv_heads == shape.heads:
            if tuple(kv) != tuple(heads):
                raise ValueError(f"layer {index}: without GQA the kept KV heads must equal the kept heads")
            return
        if sorted(set(groups)) != sorted(kv) or groups != sorted(groups):
            raise ValueError(f"layer {index}: kept query heads must lie in kept KV groups, group-major")
        per_group = [groups.count(g) for g in kv]
        if len(set(per_group)) != 1:
            raise ValueError(f"layer {index}: every kept KV group must keep the same number of query heads")

    # --- surgery ----------------------------------------------------------------------------------
    def _apply(self, slices: Iterable[ParamSlice], keeps, sizes, widths) -> None:
        for spec in slices:
            old = spec.tensor
            new = _sliced(old.data, spec, keeps, sizes, widths)
            setattr(spec.module, spec.name, nn.Parameter(new, requires_grad=old.requires_grad))
            _sync_module_features(spec.module)

    @torch.no_grad()
    def prune_layer(self, model: nn.Module, index: int, plan: LayerPlan, shape: LayerShape) -> LayerShape:
        self.validate_plan(plan, shape, index)
        layer = self.layers(model)[index]
        head_dim = self.head_dim(model.config)
        keeps = {Q: plan.keep_heads, KV: plan.keep_kv_heads, "ffn": plan.keep_neurons}
        sizes = {Q: shape.heads, KV: shape.kv_heads, "ffn": shape.ffn}
        widths = {Q: head_dim, KV: head_dim, "ffn": 1}
        self._apply(self.attention_slices(layer), keeps, sizes, widths)
        self._apply(self.ffn_slices(layer), keeps, sizes, widths)
        new_shape = plan.shape
        self.set_attention_shape(layer, new_shape, head_dim)
        return new_shape

    @torch.no_grad()
    def mask_layer(self, model: nn.Module, index: int, plan: LayerPlan, shape: LayerShape) -> None:
        """Zero the consumers of removed units in a dense layer: the reference a pruned layer must match."""
        self.validate_plan(plan, shape, index)
        layer = self.layers(model)[index]
        head_dim = self.head_dim(model.config)
        drop = {
            Q: sorted(set(range(shape.heads)) - set(plan.keep_heads)),
            KV: sorted(set(range(shape.kv_heads)) - set(plan.keep_kv_heads)),
            "ffn": sorted(set(range(shape.ffn)) - set(plan.keep_neurons)),
        }
        widths = {Q: head_dim, KV: head_dim, "ffn": 1}
        for spec in self.attention_slices(layer) + self.ffn_slices(layer):
            if spec.role != OUT or spec.dim >= spec.tensor.dim():
                continue
            (kind,) = spec.segments
            if drop[kind]:
                rows = _unit_rows(drop[kind], widths[kind])
                spec.tensor.data.index_fill_(spec.dim, rows, 0.0)

    def unit_slices(self, model: nn.Module, index: int) -> tuple[list[ParamSlice], list[ParamSlice]]:
        """A sublayer removed by depth pruning has no units: its slices are empty."""
        layer = self.layers(model)[index]
        shape = self.shapes(model.config)[index]
        return (self.attention_slices(layer) if shape.heads else [], self.ffn_slices(layer) if shape.ffn else [])

    def unit_consumers(self, model: nn.Module, index: int) -> tuple[ParamSlice, ParamSlice]:
        """The "out" weight slices of layer ``index``: attention output projection, FFN down projection.

        Their modules' *inputs* (last dim) are the per-head / per-neuron activations, so forward
        pre-hooks there can mask units, and re-fitting their weights reconstructs the layer output.
        """
        attn, ffn = self.unit_slices(model, index)
        pick = [next(s for s in group if s.role == OUT and s.name == "weight") for group in (attn, ffn)]
        return pick[0], pick[1]

    def sparsifiable_weights(self, model: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
        """(qualified name, weight, input dim) of every block matrix (q/k/v/out, FFN) for sparsity.

        The input dim is the one a matmul reduces over (N:M groups run along it): 1 for nn.Linear,
        0 for GPT-2's Conv1D, whose weight is stored (in, out).
        """
        names = {id(p): n for n, p in model.named_parameters()}
        out, seen = [], set()
        for index in range(len(self.layers(model))):
            attn, ffn = self.unit_slices(model, index)
            for spec in attn + ffn:
                tensor = spec.tensor
                if spec.name != "weight" or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                in_dim = 0 if type(spec.module).__name__ == "Conv1D" else 1
                out.append((names[id(tensor)], tensor, in_dim))
        return out

    def resize_to(self, model: nn.Module, shapes: Sequence[LayerShape]) -> None:
        """Give a freshly built dense model the stored per-layer shapes (values are loaded afterwards). A
        depth-pruned config already builds only the kept blocks; sublayers stored with 0 heads or FFN width
        0 are replaced by their no-op stand-ins."""
        from edgeprune.core.arch.sublayers import bypass_sublayers, renumber_attention

        dense = self.dense_shapes(model.config)
        for index, (current, target) in enumerate(zip(dense, shapes)):
            if current == target:
                continue
            group = self.group_size(current)
            heads, kv = target.heads or current.heads, target.kv_heads or current.kv_heads
            keep_kv = tuple(range(kv))
            per_group = heads // max(kv, 1)
            keep_heads = tuple(g * group + j for g in keep_kv for j in range(per_group))
            self.prune_layer(model, index, LayerPlan(keep_heads, keep_kv, tuple(range(target.ffn or current.ffn))),
                             current)
            bypass_sublayers(self, self.layers(model)[index], attention=not target.heads, ffn=not target.ffn)
        renumber_attention(self, model, shapes)


def _sync_module_features(module: nn.Module) -> None:
    """Keep nn.Linear / Conv1D bookkeeping attributes consistent with their new weights."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores (in, out)
        module.nx, module.nf = weight.shape


def unit_sq_norms(spec: ParamSlice, sizes: dict[str, int], widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Sum of squared weights per unit (head or neuron) in one sliced parameter, by unit kind."""
    tensor = spec.tensor.detach().float()
    dim = spec.dim
    if dim >= tensor.dim():
        return {}
    moved = tensor.movedim(dim, 0)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for kind in spec.segments:
        length = sizes[kind] * widths[kind]
        block = moved[offset:offset + length].reshape(sizes[kind], -1)
        out[kind] = out.get(kind, 0) + block.pow(2).sum(dim=1)
        offset += length
    return out
