"""Plan an expert placement: balance load, respect memory, keep co-chosen experts together.

Per MoE layer the experts form a co-activation graph (networkx; node weight = expected
assignments, edge weight = tokens that chose both experts). Each layer is placed by
`sparsify.partition.search.place_layer`: the best balance first (the most loaded rank sets the
layer's time), then, within `tolerance` of it, as much co-activation kept inside ranks as the
search finds (fewer ranks per token means fewer all-to-all bytes), never less than the
contiguous placement keeps when that one balances within the tolerance. The report shows the
planned placement next to the contiguous one (E/N experts in order per rank).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import OptionError
from ..plan import UpcyclePlan
from .memory import Footprint, format_bytes
from .metrics import LayerDemand, layer_metrics
from .placement import ExpertPlacement, contiguous_ranks, uniform_moe
from .search import place_layer
from .stats import RoutingStats

__all__ = ["plan_placement", "place_layer", "experts_per_rank_range", "DEFAULT_TOLERANCE"]

# Balances within 1% of the best count as equal: calibration counts are that noisy (a rank
# receiving 16k assignments, 65k tokens top-2 on 8 ranks, has a relative standard error near
# 0.8%), and a one-token gain in balance should not cost co-location
DEFAULT_TOLERANCE = 0.01


def experts_per_rank_range(
    num_experts: int, world_size: int, footprint: Footprint, memory_per_rank: int | None, equal_experts: bool
) -> tuple[int, int]:
    """(fewest, most) experts a rank may hold in each layer; `OptionError` when no placement
    satisfies the world size or the memory limit."""
    e, n = num_experts, world_size
    if n < 1:
        raise OptionError(f"--world-size must be 1 or more, got {n}")
    if n > e:
        raise OptionError(f"--world-size {n} exceeds the {e} experts per layer; every rank must hold at least one expert")
    if equal_experts and e % n:
        divisors = ", ".join(str(d) for d in range(1, e + 1) if e % d == 0)
        raise OptionError(f"--world-size {n} does not divide the {e} experts per layer, and every rank must hold "
                          f"the same number of them; choose {divisors}, or pass --uneven")
    lo, hi = (e // n, e // n) if equal_experts else (1, e - n + 1)
    if memory_per_rank is not None:
        least = math.ceil(e / n)
        per_layer = sum(footprint.expert_bytes.values())
        need = footprint.replicated_bytes + least * per_layer
        if need > memory_per_rank:
            raise OptionError(
                f"--memory-per-rank {format_bytes(memory_per_rank)} is too small for any placement: each rank needs "
                f"{format_bytes(need)} ({format_bytes(footprint.replicated_bytes)} replicated + {least} experts per "
                f"layer, {format_bytes(least * per_layer)}); use more ranks or more memory"
            )
        room = (memory_per_rank - footprint.replicated_bytes) // per_layer if per_layer else hi
        hi = min(hi, int(room))
    return lo, hi


def plan_placement(
    plan: UpcyclePlan,
    world_size: int,
    footprint: Footprint,
    stats: RoutingStats | None = None,
    memory_per_rank: int | None = None,
    equal_experts: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExpertPlacement:
    """Place the experts of every MoE layer of `plan` on `world_size` ranks, with a report."""
    if not plan.selected:
        raise OptionError("the model has no MoE layers; upcycle it before partitioning")
    moe = uniform_moe(plan)
    if tolerance < 0:
        raise OptionError(f"--tolerance must be non-negative, got {tolerance}")
    e, k, n = moe.num_experts, moe.top_k, world_size
    lo, hi = experts_per_rank_range(e, n, footprint, memory_per_rank, equal_experts)
    if stats is not None:
        stats.check_matches(plan)
    layers, report_layers = {}, {}
    for site in plan.selected_sites:
        demand = LayerDemand.from_stats(stats.layers[site.path], k) if stats else LayerDemand.uniform(e, k)
        naive = contiguous_ranks(e, n)
        placed = place_layer(demand, n, lo, hi, tolerance, contiguous=naive)
        ranks = layers[site.path] = placed.ranks
        metrics = layer_metrics(ranks, demand, n, site.hidden_size, footprint.element_size)
        metrics["experts_per_rank"] = np.bincount(ranks, minlength=n).tolist()
        # whether the branch and bound completed: no placement balances better / keeps more
        metrics["proven_optimal"] = {"balance": placed.balance_optimal, "traffic": placed.traffic_optimal}
        metrics["best_imbalance"] = round(placed.best_max_load / (float(demand.load.sum()) / n), 6) if demand.load.sum() else 1.0
        metrics["contiguous"] = layer_metrics(naive, demand, n, site.hidden_size, footprint.element_size)
        report_layers[site.path] = metrics
    placement = ExpertPlacement(n, e, layers, equal_experts)
    memory = [footprint.rank_bytes({p: placement.counts(p)[r] for p in layers}) for r in range(n)]
    naive_memory = [footprint.rank_bytes({p: c for p in layers}) for c in np.bincount(contiguous_ranks(e, n), minlength=n).tolist()]

    def overall(key: str, sub: bool = False) -> float:
        # Layers run one after another, so the step time follows the sum of per-layer maxima.
        vals = [(m["contiguous"] if sub else m)[key] for m in report_layers.values()]
        return round(sum(vals) / len(vals), 6) if key == "imbalance" else round(sum(vals), 3)

    placement.report = {
        "world_size": n,
        "experts_per_layer": e,
        "top_k": k,
        "tolerance": tolerance,
        "stats": (stats.calibration.get("source", "given") if stats else "none (uniform load assumed)"),
        "imbalance": overall("imbalance"),
        "contiguous_imbalance": overall("imbalance", True),
        "a2a_bytes_per_token": overall("a2a_bytes_per_token"),
        "contiguous_a2a_bytes_per_token": overall("a2a_bytes_per_token", True),
        "memory_per_rank": memory,
        "contiguous_memory_per_rank": naive_memory,
        "replicated_bytes": footprint.replicated_bytes,
        "memory_limit": memory_per_rank,
        "layers": report_layers,
    }
    return placement
