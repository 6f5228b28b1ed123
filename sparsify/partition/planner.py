"""Plan an expert placement: balance load, respect memory, keep co-chosen experts together.

Per MoE layer the experts form a co-activation graph (networkx; node weight = expected
assignments, edge weight = tokens that chose both experts). The planner

1. assigns experts by decreasing load to the least-loaded rank that has room (LPT), breaking
   ties toward the rank whose experts the expert is most often chosen with;
2. moves and swaps experts off the most loaded rank while that lowers (max load, sum of
   squared loads): the balance that sets each layer's time;
3. swaps experts between ranks to keep more co-activation weight inside ranks, never letting
   a rank's load pass the balanced maximum (times 1 + `tolerance`): fewer ranks per token
   means fewer all-to-all bytes.

The result is kept only when it beats the contiguous placement (E/N experts in order per
rank); the report shows both.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import OptionError
from ..plan import UpcyclePlan
from .memory import Footprint, format_bytes
from .metrics import LayerDemand, layer_metrics
from .placement import ExpertPlacement, contiguous_ranks, uniform_moe
from .stats import RoutingStats

__all__ = ["plan_placement", "place_layer", "experts_per_rank_range"]

_EPS = 1e-9


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


def _greedy(d: LayerDemand, w: np.ndarray, n: int, lo: int, hi: int) -> np.ndarray:
    e = len(d.load)
    ranks = np.full(e, -1)
    load, count = np.zeros(n), np.zeros(n, dtype=int)
    for placed, x in enumerate(sorted(range(e), key=lambda x: (-d.load[x], x))):
        short = int(np.maximum(lo - count, 0).sum())  # slots that must still be filled
        must_fill = short >= e - placed
        best = None
        for r in range(n):
            if count[r] >= hi or (must_fill and count[r] >= lo):
                continue
            key = (load[r], -w[x, ranks == r].sum(), r)
            best = key if best is None or key < best else best
        ranks[x] = best[2]
        load[best[2]] += d.load[x]
        count[best[2]] += 1
    return ranks


def _rank_loads(ranks: np.ndarray, load: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    np.add.at(out, ranks, load)
    return out


def _balance(ranks: np.ndarray, load: np.ndarray, n: int, lo: int, hi: int) -> np.ndarray:
    """Moves and swaps off the most loaded rank while (max, sum of squares) decreases."""
    ranks = ranks.copy()
    for _ in range(len(load) * n):
        rl = _rank_loads(ranks, load, n)
        counts = np.bincount(ranks, minlength=n)
        a = int(rl.argmax())
        mine = np.nonzero(ranks == a)[0]
        others = np.nonzero(ranks != a)[0]
        base = (rl.max(), float((rl**2).sum()))
        best, best_key = None, base
        for b in range(n):
            if b == a:
                continue
            rest = np.delete(rl, [a, b]).max(initial=0.0)
            cand = []  # (new load of a, new load of b, expert leaving a, expert leaving b or -1)
            if counts[a] > lo and counts[b] < hi:
                cand += [(rl[a] - load[i], rl[b] + load[i], i, -1) for i in mine]
            theirs = others[ranks[others] == b]
            cand += [(rl[a] - load[i] + load[j], rl[b] + load[i] - load[j], i, j) for i in mine for j in theirs]
            for na, nb, i, j in cand:
                key = (max(na, nb, rest), base[1] - rl[a] ** 2 - rl[b] ** 2 + na**2 + nb**2)
                if key[0] < best_key[0] - _EPS or (abs(key[0] - best_key[0]) <= _EPS and key[1] < best_key[1] - _EPS):
                    best, best_key = (i, j, b), key
        if best is None:
            break
        i, j, b = best
        ranks[i] = b
        if j >= 0:
            ranks[j] = a
    return ranks


def _keep_together(ranks: np.ndarray, load: np.ndarray, w: np.ndarray, n: int, bound: float) -> np.ndarray:
    """Best-gain swaps that raise co-activation kept inside ranks, loads staying <= bound."""
    ranks = ranks.copy()
    e = len(load)
    for _ in range(e * e):
        onehot = np.eye(n)[ranks]  # [E, N]
        aff = w @ onehot  # aff[i, r]: co-activation between expert i and rank r's experts
        rl = _rank_loads(ranks, load, n)
        own = aff[np.arange(e), ranks]
        # gain of swapping i and j: both gain their affinity to the other's rank, lose their own
        gain = aff[:, ranks] - own[:, None] + (aff[:, ranks] - own[:, None]).T - 2 * w
        delta = load[:, None] - load[None, :]  # load moving from rank(i) to rank(j)
        ok = (ranks[:, None] != ranks[None, :]) & (rl[ranks][:, None] - delta <= bound + _EPS) & (rl[ranks][None, :] + delta <= bound + _EPS)
        gain = np.where(ok, gain, -np.inf)
        i, j = np.unravel_index(int(gain.argmax()), gain.shape)
        if not gain[i, j] > _EPS * max(1.0, float(w.sum())):
            break
        ranks[i], ranks[j] = ranks[j], ranks[i]
    return ranks


def place_layer(demand: LayerDemand, world_size: int, lo: int, hi: int, tolerance: float = 0.0) -> list[int]:
    """The rank of each expert of one layer (see the module docstring for the method)."""
    n = world_size
    w = demand.coactivation
    ranks = _greedy(demand, w, n, lo, hi)
    ranks = _balance(ranks, demand.load, n, lo, hi)
    bound = _rank_loads(ranks, demand.load, n).max() * (1.0 + tolerance)
    ranks = _keep_together(ranks, demand.load, w, n, bound)
    naive = np.array(contiguous_ranks(len(demand.load), n))
    if lo <= min(np.bincount(naive, minlength=n)) and max(np.bincount(naive, minlength=n)) <= hi:
        def key(r: np.ndarray) -> tuple[float, float]:
            same = r[:, None] == r[None, :]
            return round(float(_rank_loads(r, demand.load, n).max()), 9), -float((w * same).sum())

        if not key(ranks) < key(naive):
            ranks = naive
    return [int(r) for r in ranks]


def plan_placement(
    plan: UpcyclePlan,
    world_size: int,
    footprint: Footprint,
    stats: RoutingStats | None = None,
    memory_per_rank: int | None = None,
    equal_experts: bool = True,
    tolerance: float = 0.0,
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
        ranks = place_layer(demand, n, lo, hi, tolerance)
        layers[site.path] = ranks
        naive = contiguous_ranks(e, n)
        metrics = layer_metrics(ranks, demand, n, site.hidden_size, footprint.element_size)
        metrics["experts_per_rank"] = np.bincount(ranks, minlength=n).tolist()
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
