"""`partition-experts`: place each MoE layer's experts on the ranks of an expert-parallel job.

A lowering pass: it reads the plan and the model's footprint, changes neither, and leaves an
`ExpertPlacement` on `model.sparsify_placement` (and on the pass as `.placement`).

    pm = PassManager([FindFFN(), SelectLayers(every=2), UpcycleFFN(experts=8), PartitionExperts(world_size=4)])
    placement = pm.run(model).model.sparsify_placement
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OptionError
from .infra import Pass, PassContext, PostconditionError, PreconditionError

__all__ = ["PartitionExperts"]


class PartitionExperts(Pass):
    """Plan an expert placement over `world_size` ranks (see `sparsify.partition.planner`).

    `stats`: a `RoutingStats` or the path of a stats.json (uniform load without it);
    `memory_per_rank`: bytes or a size like "80GB"; `equal_experts`: every rank holds E/N
    experts per layer (False: counts may differ, to balance skewed load better); `tolerance`:
    how far above the best balanced maximum a rank's load may go to keep co-chosen experts
    together (None: the planner's `DEFAULT_TOLERANCE`, 1%).
    """

    name = "partition-experts"

    def __init__(
        self,
        world_size: int,
        stats: Any = None,
        memory_per_rank: int | str | None = None,
        equal_experts: bool = True,
        tolerance: float | None = None,
    ):
        from ..partition.memory import parse_memory
        from ..partition.stats import RoutingStats

        if not isinstance(world_size, int) or world_size < 1:
            raise OptionError(f"--world-size must be 1 or more, got {world_size}")
        if tolerance is None:
            from ..partition.planner import DEFAULT_TOLERANCE

            tolerance = DEFAULT_TOLERANCE
        if tolerance < 0:
            raise OptionError(f"--tolerance must be non-negative, got {tolerance}")
        self.world_size, self.equal_experts, self.tolerance = world_size, equal_experts, tolerance
        self.memory_per_rank = None if memory_per_rank is None else parse_memory(memory_per_rank)
        self.stats = RoutingStats.load(stats) if isinstance(stats, (str, Path)) else stats
        self.placement = None

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.layers or not ctx.plan.selected:
            raise PreconditionError("partition-experts needs MoE layers; run upcycle-ffn before it")
        from ..moe import SparseMoE

        for path in ctx.plan.selected:
            if not isinstance(ctx.model.get_submodule(path), SparseMoE):
                raise PreconditionError(f"'{path}' is not an MoE layer yet; run upcycle-ffn before partition-experts")

    def call(self, ctx: PassContext) -> bool:
        from ..partition.memory import footprint_of_module
        from ..partition.placement import uniform_moe
        from ..partition.planner import plan_placement

        plan = ctx.plan
        footprint = footprint_of_module(ctx.model, plan.selected, uniform_moe(plan).num_experts)
        self.placement = plan_placement(plan, self.world_size, footprint, self.stats, self.memory_per_rank,
                                        self.equal_experts, self.tolerance)
        ctx.model.sparsify_placement = self.placement
        return False

    def ensures(self, ctx: PassContext) -> None:
        if self.placement is None or set(self.placement.layers) != set(ctx.plan.selected):
            raise PostconditionError("partition-experts did not place every MoE layer")

    def __repr__(self) -> str:
        return f"PartitionExperts(world_size={self.world_size})"
