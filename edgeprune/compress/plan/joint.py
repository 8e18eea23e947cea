"""``joint``: greedy removal under a FLOPs budget on each layer's full Fisher block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeprune.compress.plan.base import PrunePlan, register_allocation
from edgeprune.compress.plan.config import StructuredConfig
from edgeprune.compress.plan.units import HeadUnits
from edgeprune.compress.plan.rearrange import _kv_group_block
from edgeprune.core.arch.base import ArchAdapter, LayerPlan, LayerShape
from edgeprune.core.errors import EdgePruneError

ALLOCATIONS_NEEDING_INTERACTIONS = {"joint"}


@dataclass
class _Block:
    """One layer's removable heads (or KV groups) or neurons, with their Fisher block."""

    layer: int
    kind: str  # "heads" | "neurons"
    fisher: torch.Tensor  # [units, units], float64
    cost: float  # block FLOPs of one unit
    removed: torch.Tensor  # bool [units]
    marginal: torch.Tensor  # loss added by removing each unit now: F_uu + 2 sum_{v removed} F_uv

    def cheapest(self) -> tuple[float, int]:
        """(added loss per FLOP, unit) of the best next removal; inf when only one unit is left."""
        if int((~self.removed).sum()) <= 1:
            return float("inf"), -1
        values = self.marginal.masked_fill(self.removed, float("inf"))
        unit = int(torch.argmin(values))
        return float(values[unit]) / self.cost, unit

    def remove(self, unit: int) -> None:
        self.removed[unit] = True
        self.marginal += 2 * self.fisher[:, unit]

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(int(u) for u in torch.nonzero(~self.removed).flatten())


def _joint_blocks(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter, config) -> list[_Block]:
    blocks = []
    for i, shape in enumerate(shapes):
        head_block = scores.head_interactions[i].double()
        units = HeadUnits.of(shape, cfg.gqa_mode)
        if units.mode == "within":
            raise EdgePruneError("allocation 'joint' prunes GQA models by whole KV groups: use --gqa-mode groups")
        if units.mode == "groups":
            head_block = _kv_group_block(head_block, shape)
        removed_shape = units.without_one()
        full = adapter.block_flops(config, shape, cfg.seq_len)
        neuron_block = scores.neuron_interactions[i].double()
        for kind, fisher, smaller in (("heads", head_block, removed_shape),
                                      ("neurons", neuron_block, LayerShape(shape.heads, shape.kv_heads, shape.ffn - 1))):
            blocks.append(_Block(i, kind, fisher, float(full - adapter.block_flops(config, smaller, cfg.seq_len)),
                                 torch.zeros(fisher.shape[0], dtype=torch.bool), fisher.diagonal().clone()))
    return blocks


@register_allocation("joint")
def joint_allocation(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter,
                     config) -> PrunePlan:
    """Greedy search under the FLOPs budget on each layer's full Fisher block (Kwon et al.'s block-diagonal
    approximation, used for the search itself rather than only to rearrange its result): repeatedly remove
    the unit that adds the least loss per FLOP, counting its interactions with the units already removed
    from its layer. Needs ``--flops-budget`` (StructuredConfig enforces it) and an importance with interactions
    (fisher). ``round_to`` then removes each layer's next-cheapest neurons down to a multiple (the budget
    still holds)."""
    if scores.head_interactions is None or scores.neuron_interactions is None:
        raise EdgePruneError("allocation 'joint' needs an importance with unit interactions (--importance fisher)")
    seq_len = cfg.seq_len
    dense_flops = sum(adapter.block_flops(config, s, seq_len) for s in adapter.dense_shapes(config))
    kept_flops = sum(adapter.block_flops(config, s, seq_len) for s in shapes)
    blocks = _joint_blocks(scores, shapes, cfg, adapter, config)
    best = [b.cheapest() for b in blocks]
    budget = cfg.flops_budget * dense_flops
    while kept_flops > budget:
        k = min(range(len(blocks)), key=lambda j: best[j][0])
        if best[k][0] == float("inf"):
            raise EdgePruneError("the FLOPs budget is below the minimum of one head and one neuron per layer")
        blocks[k].remove(best[k][1])
        kept_flops -= blocks[k].cost
        best[k] = blocks[k].cheapest()
    if cfg.round_to > 1:
        for block in blocks:
            if block.kind == "neurons":
                while len(block.kept) % cfg.round_to and len(block.kept) > cfg.round_to:
                    block.remove(block.cheapest()[1])
    layers = []
    for i, shape in enumerate(shapes):
        heads, neurons = blocks[2 * i].kept, blocks[2 * i + 1].kept  # head units: heads, or KV groups
        units = HeadUnits.of(shape, cfg.gqa_mode)
        layers.append(LayerPlan(heads if units.mode == "mha" else units.group_heads(heads), heads, neurons))
    plan = PrunePlan(layers, list(shapes))
    kept = sum(adapter.block_flops(config, s, seq_len) for s in plan.shapes)
    plan.meta.update({"dense_block_flops": dense_flops, "kept_block_flops": kept,
                      "kept_flops_fraction": round(kept / dense_flops, 6), "seq_len": seq_len})
    return plan
