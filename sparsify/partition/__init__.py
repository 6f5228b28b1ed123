"""Expert partitioning: routing statistics, placement planning, the expert-parallel runtime,
and per-rank shards.

    sparsify profile MOE --demo-text -o stats.json                 # RoutingStats
    sparsify partition MOE --world-size 4 --stats stats.json -o plan.json   # ExpertPlacement
    sparsify shard MOE --plan plan.json -o shards/                 # write_shards
    model = sparsify.load("shards/", group=group)                  # ExpertParallelMoE layers
"""

from .expert_parallel import ExpertParallelMoE, expert_parallel, sync_gradients
from .loader import load_expert_parallel
from .placement import ExpertPlacement
from .planner import plan_placement
from .profile import profile_routing
from .shards import write_shards
from .stats import RoutingStats

__all__ = [
    "RoutingStats",
    "profile_routing",
    "ExpertPlacement",
    "plan_placement",
    "ExpertParallelMoE",
    "expert_parallel",
    "sync_gradients",
    "load_expert_parallel",
    "write_shards",
]
