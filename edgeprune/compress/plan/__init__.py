"""Prune plans: which heads, KV heads and FFN neurons each layer keeps, and the allocators that make them.

``config`` (StructuredConfig), ``base`` (PrunePlan, counting, the allocator registry), ``units`` (head and
neuron units; GQA handled there), one module per allocator (``uniform``, ``global_search``: global and
flops_budget, ``joint``), and ``rearrange`` (Kwon et al.'s mask rearrangement).
"""

from edgeprune.compress.plan.base import (PrunePlan, budget_for_fractions, effective_allocation, get_allocation,
                                          kept_count, register_allocation, top_sorted)
from edgeprune.compress.plan.config import GQA_MODES, StructuredConfig
from edgeprune.compress.plan.units import heads_for_layer

# Importing the allocator modules registers them.
from edgeprune.compress.plan import global_search, joint, uniform  # noqa: E402,F401
from edgeprune.compress.plan.joint import ALLOCATIONS_NEEDING_INTERACTIONS, joint_allocation  # noqa: E402
from edgeprune.compress.plan.rearrange import rearrange_plan  # noqa: E402
from edgeprune.compress.plan.global_search import flops_budget_allocation, global_allocation  # noqa: E402
from edgeprune.compress.plan.uniform import uniform_allocation  # noqa: E402

__all__ = ["ALLOCATIONS_NEEDING_INTERACTIONS", "GQA_MODES", "PrunePlan", "StructuredConfig", "budget_for_fractions",
           "effective_allocation", "flops_budget_allocation", "get_allocation", "global_allocation", "heads_for_layer",
           "joint_allocation", "kept_count", "rearrange_plan", "register_allocation", "top_sorted", "uniform_allocation"]
