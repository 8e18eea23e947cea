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
    # [units, units], symmetric, in any float dtype (rows are widened to float64 as they are used), or any
    # object with ``shape``, ``diagonal()`` and row indexing (the sequential path's rows on disk)
    fisher: torch.Tensor
    cost: float  # block FLOPs of one unit
    removed: torch.Tensor  # bool [units]
    marginal: torch.Tensor  # loss added by removing each unit now: F_uu + 2 sum_{v removed} F_uv
    flops: float = 0.0  # block FLOPs of one unit (the budget), whatever ``cost`` ranks by
    frozen: bool = False  # removed by depth pruning in the same call: width pruning leaves it alone

    def cheapest(self) -> tuple[float, int]:
        """(added loss per unit of cost, unit) of the best next removal; inf when only one unit is left."""
        if self.frozen or int((~self.removed).sum()) <= 1:
            return float("inf"), -1
        values = self.marginal.masked_fill(self.removed, float("inf"))
        unit = int(torch.argmin(values))
        return float(values[unit]) / self.cost, unit

    def remove(self, unit: int) -> None:
        self.removed[unit] = True
        self.marginal += 2 * self.fisher[unit].double()  # the row: equal to the column, and contiguous

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(int(u) for u in torch.nonzero(~self.removed).flatten())


def _joint_blocks(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter, config,
                  price: "RuntimePrice | None" = None) -> list[_Block]:
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
        neuron_block = scores.neuron_interactions[i]  # not widened whole: float32 is half the memory
        for kind, fisher, smaller in (("heads", head_block, removed_shape),
                                      ("neurons", neuron_block, LayerShape(shape.heads, shape.kv_heads, shape.ffn - 1))):
            flops = float(full - adapter.block_flops(config, smaller, cfg.seq_len))
            cost = flops if price is None else price.unit_cost(kind, shape.heads - smaller.heads)
            # a sublayer that depth pruning removes anyway is frozen: no budget is spent on it
            blocks.append(_Block(i, kind, fisher, cost, torch.zeros(fisher.shape[0], dtype=torch.bool),
                                 fisher.diagonal().to(torch.float64, copy=True), flops,
                                 price is not None and price.removed_with_depth(i, kind)))
    return blocks


class RuntimePrice:
    """Unit prices and the stopping rule of a runtime-priced search: each head unit and neuron costs the
    decode time the measured cost model gives it on the target runtime (``edgeprune cost measure``), and the
    search stops when the predicted decode / prefill speedups over the dense layout are reached. Blocks and
    sublayers that depth pruning removes are priced as removed (a width+depth plan is priced as a whole)."""

    def __init__(self, cfg: StructuredConfig, dense: list[LayerShape], depth_plan=None):
        from edgeprune.compress.cost_model import load_cost_model

        self.file = cfg.cost_model
        self.cost = load_cost_model(cfg.cost_model)
        self.targets = {"decode": cfg.decode_speedup, "prefill": cfg.prefill_speedup}
        self.dense = [(s.heads, s.kv_heads, s.ffn) for s in dense]
        self.depth = depth_plan
        per_head, per_neuron = self.cost.decode_coef[3], self.cost.decode_coef[4]
        if per_head <= 0 or per_neuron <= 0:
            raise EdgePruneError(f"{cfg.cost_model}: the cost model prices heads or neurons at <= 0 ms "
                                 f"(head {per_head * 1e3:.4f}, neuron {per_neuron * 1e3:.6f}); measure it again")

    def unit_cost(self, kind: str, heads_per_unit: int) -> float:
        return self.cost.decode_coef[3] * heads_per_unit if kind == "heads" else self.cost.decode_coef[4]

    def removed_with_depth(self, layer: int, kind: str) -> bool:
        d = self.depth
        if d is None:
            return False
        return layer in d.drop_blocks or layer in (d.drop_attention if kind == "heads" else d.drop_ffn)

    def layout(self, shapes: list[LayerShape]) -> list[tuple[int, int, int]]:
        """What the runtime will run: depth-removed blocks gone, removed sublayers at width 0."""
        d = self.depth
        out = []
        for i, s in enumerate(shapes):
            if d is not None and i in d.drop_blocks:
                continue
            attention_gone = d is not None and i in d.drop_attention
            ffn_gone = d is not None and i in d.drop_ffn
            out.append((0 if attention_gone else s.heads, 0 if attention_gone else s.kv_heads,
                        0 if ffn_gone else s.ffn))
        return out

    def speedup(self, shapes: list[LayerShape]) -> dict[str, float]:
        return self.cost.speedup(self.layout(shapes), self.dense)

    def reached(self, shapes: list[LayerShape]) -> bool:
        predicted = self.speedup(shapes)
        return all(t is None or predicted[k] >= t for k, t in self.targets.items())

    def record(self, shapes: list[LayerShape]) -> dict:
        return {"cost_model": str(self.file), "cost_model_source": self.cost.source,
                "cost_model_measured_at": self.cost.measured_at,
                "targets": {k: t for k, t in self.targets.items() if t is not None},
                "predicted_speedup": {k: round(v, 4) for k, v in self.speedup(shapes).items()}}


@register_allocation("joint")
def joint_allocation(scores, shapes: list[LayerShape], cfg: StructuredConfig, adapter: ArchAdapter,
                     config, depth_plan=None) -> PrunePlan:
    """Greedy search under the FLOPs budget on each layer's full Fisher block (Kwon et al.'s block-diagonal
    approximation, used for the search itself rather than only to rearrange its result): repeatedly remove
    the unit that adds the least loss per FLOP, counting its interactions with the units already removed
    from its layer. Needs ``--flops-budget`` (StructuredConfig enforces it) and an importance with interactions
    (fisher). ``round_to`` then removes each layer's next-cheapest neurons down to a multiple (the budget
    still holds). With ``cfg.cost_model`` the units are priced by the decode time they cost on the target
    runtime (``RuntimePrice``) and the search runs until the predicted speedups are reached; ``depth_plan``
    (blocks / sublayers removed by depth pruning in the same compress call) is part of that prediction."""
    if scores.head_interactions is None or scores.neuron_interactions is None:
        raise EdgePruneError("allocation 'joint' needs an importance with unit interactions (--importance fisher)")
    seq_len = cfg.seq_len
    dense_flops = sum(adapter.block_flops(config, s, seq_len) for s in adapter.dense_shapes(config))
    kept_flops = sum(adapter.block_flops(config, s, seq_len) for s in shapes)
    price = RuntimePrice(cfg, adapter.dense_shapes(config), depth_plan) if cfg.cost_model else None
    blocks = _joint_blocks(scores, shapes, cfg, adapter, config, price)
    best = [b.cheapest() for b in blocks]
    budget = cfg.flops_budget * dense_flops if cfg.flops_budget is not None else float("inf")
    # the priced search is checked every `check_every` removals (a prediction sums all layers)
    speed_met, since_check = price is None, 0
    while kept_flops > budget or not speed_met:
        k = min(range(len(blocks)), key=lambda j: best[j][0])
        if best[k][0] == float("inf"):
            if kept_flops > budget:
                raise EdgePruneError("the FLOPs budget is below the minimum of one head and one neuron per layer")
            reachable = price.record(_shapes(blocks, shapes, cfg))["predicted_speedup"]
            raise EdgePruneError(f"the speedup target cannot be reached by width pruning (at most {reachable} with "
                                 "one head unit and one neuron per layer): add depth pruning (--layers)")
        blocks[k].remove(best[k][1])
        kept_flops -= blocks[k].flops
        best[k] = blocks[k].cheapest()
        if price is not None and not speed_met:
            since_check += 1
            if since_check >= 8:
                since_check, speed_met = 0, price.reached(_shapes(blocks, shapes, cfg))
    if cfg.round_to > 1:
        for block in blocks:
            if block.kind == "neurons":
                while len(block.kept) % cfg.round_to and len(block.kept) > cfg.round_to and not block.frozen:
                    block.remove(block.cheapest()[1])
    plan = PrunePlan(_layer_plans(blocks, shapes, cfg), list(shapes))
    kept = sum(adapter.block_flops(config, s, seq_len) for s in plan.shapes)
    plan.meta.update({"dense_block_flops": dense_flops, "kept_block_flops": kept,
                      "kept_flops_fraction": round(kept / dense_flops, 6), "seq_len": seq_len})
    if price is not None:
        plan.meta["runtime_priced"] = price.record(plan.shapes)
    return plan


def _layer_plans(blocks: list[_Block], shapes: list[LayerShape], cfg: StructuredConfig) -> list[LayerPlan]:
    layers = []
    for i, shape in enumerate(shapes):
        heads, neurons = blocks[2 * i].kept, blocks[2 * i + 1].kept  # head units: heads, or KV groups
        units = HeadUnits.of(shape, cfg.gqa_mode)
        layers.append(LayerPlan(heads if units.mode == "mha" else units.group_heads(heads), heads, neurons))
    return layers


def _shapes(blocks: list[_Block], shapes: list[LayerShape], cfg: StructuredConfig) -> list[LayerShape]:
    return PrunePlan(_layer_plans(blocks, shapes, cfg), list(shapes)).shapes
