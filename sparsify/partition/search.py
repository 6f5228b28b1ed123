"""The placement of one MoE layer's experts: balance first, then co-activation kept inside ranks.

What is optimised, in this order:

1. balance: the expected load of the most loaded rank (it sets the layer's time), then the sum
   of squared rank loads. Searched from LPT (experts by decreasing load to the least loaded
   rank with room) and from the contiguous placement, then by the branch and bound of
   `sparsify.partition.exact`. The best maximum L found sets the bound every result keeps: no
   rank above `L * (1 + tolerance)`.
2. traffic: a token is sent once to each rank that holds any of its experts, so the planner keeps
   as much co-activation (tokens that chose both experts of a pair) inside ranks as it finds
   without a rank passing the bound. Searched from the contiguous placement (when within the
   bound) and from the balanced ones, then by branch and bound.
3. the result: the most co-activation kept, then the lowest (max load, sum of squares); the
   contiguous start wins ties.

The local searches are Kernighan-Lin passes of moves and swaps that keep each rank's expert
count within [lo, hi]; every search returns the best placement it met, never worse than its
start. So the result keeps at least as much co-activation as the contiguous placement whenever
that one balances within the bound: the planned traffic is then at most its traffic. A placement
that balances better than the contiguous one may send more. For small layers (8 experts) the
branch and bound completes and proves both steps optimal; for large ones it stops at its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exact import DEFAULT_BUDGET, max_kept, min_max_load
from .metrics import LayerDemand

__all__ = ["place_layer", "LayerPlacement", "balanced_ranks", "kept_coactivation"]

_EPS = 1e-9


def kept_coactivation(ranks: np.ndarray, w: np.ndarray) -> float:
    """Co-activation (tokens that chose both experts of a pair) of the pairs that share a rank."""
    same = ranks[:, None] == ranks[None, :]
    return float((w * same).sum()) / 2


def _rank_loads(ranks: np.ndarray, load: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    np.add.at(out, ranks, load)
    return out


def _greedy(load: np.ndarray, w: np.ndarray, n: int, lo: int, hi: int) -> np.ndarray:
    """LPT: by decreasing load to the least loaded rank with room; ties toward the rank whose
    experts the expert is most often chosen with."""
    e = len(load)
    ranks = np.full(e, -1)
    rl, count = np.zeros(n), np.zeros(n, dtype=int)
    for placed, x in enumerate(sorted(range(e), key=lambda x: (-load[x], x))):
        short = int(np.maximum(lo - count, 0).sum())  # slots that must still be filled
        must_fill = short >= e - placed
        best = None
        for r in range(n):
            if count[r] >= hi or (must_fill and count[r] >= lo):
                continue
            key = (rl[r], -w[x, ranks == r].sum(), r)
            best = key if best is None or key < best else best
        ranks[x] = best[2]
        rl[best[2]] += load[x]
        count[best[2]] += 1
    return ranks


def _steps(ranks: np.ndarray, load: np.ndarray, w: np.ndarray, n: int, lo: int, hi: int, limit: float,
           free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every move (free expert i to rank s) and swap (free experts i and j): its gain in
    co-activation kept, its change of the sum of squared loads, and whether it keeps the expert
    counts within [lo, hi] and every load within `limit`; arrays [E, N + E], moves in columns
    0..N-1, the swap of i and j in column N + j."""
    e = len(load)
    onehot = np.eye(n)[ranks]  # [E, N]
    aff = w @ onehot  # aff[i, r]: co-activation between expert i and rank r's experts
    rl = onehot.T @ load
    counts = onehot.sum(axis=0)
    own = aff[np.arange(e), ranks]
    here = rl[ranks]  # the load of each expert's rank
    # a move: i gains its affinity to s and loses its own
    move_gain = aff - own[:, None]
    move_to = rl[None, :] + load[:, None]
    move_sq = (here - load)[:, None] ** 2 + move_to**2 - here[:, None] ** 2 - rl[None, :] ** 2
    move_ok = ((ranks[:, None] != np.arange(n)[None, :]) & (counts[ranks] > lo)[:, None]
               & (counts[None, :] < hi) & (move_to <= limit) & free[:, None])
    # a swap: each gains its affinity to the other's rank, loses its own, and the pair is split
    cross = aff[:, ranks] - own[:, None]
    swap_gain = cross + cross.T - 2 * w
    delta = load[:, None] - load[None, :]  # load moving from rank(i) to rank(j)
    new_i, new_j = here[:, None] - delta, here[None, :] + delta
    swap_sq = new_i**2 + new_j**2 - here[:, None] ** 2 - here[None, :] ** 2
    swap_ok = ((ranks[:, None] < ranks[None, :]) & (new_i <= limit) & (new_j <= limit)
               & free[:, None] & free[None, :])
    return (np.concatenate([move_gain, swap_gain], axis=1), np.concatenate([move_sq, swap_sq], axis=1),
            np.concatenate([move_ok, swap_ok], axis=1))


def _pick(primary: np.ndarray, secondary: np.ndarray, ok: np.ndarray, tol: float) -> tuple[int, int] | None:
    """The allowed step with the lowest `primary`, ties (within `tol`) to the lowest `secondary`."""
    if not ok.any():
        return None
    near = ok & (primary <= primary[ok].min() + tol)
    i, c = np.unravel_index(int(np.where(near, secondary, np.inf).argmin()), ok.shape)
    return int(i), int(c)


def _search(ranks: np.ndarray, demand: LayerDemand, n: int, lo: int, hi: int, bound: float, goal: str) -> np.ndarray:
    """Kernighan-Lin passes: from the best placement so far take up to E best allowed steps in a
    row, each expert moving at most once and a step taken even when it loses, and keep the best
    placement met; stop after a pass that meets none better. Accepting losing steps inside a
    pass is what leaves the local optima where single improving steps stop.

    `goal` "balance": lower (max load, sum of squared loads), steps preferring to keep
    co-activation; "traffic": raise the co-activation kept, then lower (max load, sum of
    squares), no rank above `bound`."""
    load, w = demand.load, demand.coactivation
    e = len(load)
    tol = _EPS * max(1.0, float(w.sum()), float(load.sum()) ** 2)
    limit = bound + _EPS * max(1.0, bound)

    def key(r: np.ndarray) -> tuple[float, ...]:
        rl = _rank_loads(r, load, n)
        balance = (round(float(rl.max()), 9), round(float((rl**2).sum()), 9))
        return balance if goal == "balance" else (-round(kept_coactivation(r, w), 9), *balance)

    best, best_key = ranks.copy(), key(ranks)
    for _ in range(4 * e):  # a safeguard: every pass but the last improves `best_key`
        current, free, improved = best.copy(), np.ones(e, dtype=bool), False
        for _ in range(e):
            gain, sq, ok = _steps(current, load, w, n, lo, hi, limit, free)
            step = _pick(sq, -gain, ok, tol) if goal == "balance" else _pick(-gain, sq, ok, tol)
            if step is None:
                break
            i, c = step
            if c < n:
                current[i] = c
            else:
                j = c - n
                current[i], current[j] = current[j], current[i]
                free[j] = False
            free[i] = False
            k = key(current)
            if k < best_key:
                best, best_key, improved = current.copy(), k, True
        if not improved:
            break
    return best


def balanced_ranks(demand: LayerDemand, n: int, lo: int, hi: int, start: np.ndarray | None = None) -> np.ndarray:
    """Step 1 of the module docstring, searched from `start` (default: LPT)."""
    if start is None:
        start = _greedy(demand.load, demand.coactivation, n, lo, hi)
    return _search(np.asarray(start), demand, n, lo, hi, np.inf, "balance")


@dataclass
class LayerPlacement:
    """The placement of one layer's experts, and whether the branch and bound of
    `sparsify.partition.exact` proved its balance and its co-activation kept optimal."""

    ranks: list[int]
    best_max_load: float  # the best balance found: the plan keeps within tolerance of it
    balance_optimal: bool
    traffic_optimal: bool


def place_layer(demand: LayerDemand, world_size: int, lo: int, hi: int, tolerance: float = 0.0,
                contiguous: list[int] | None = None, budget: int = DEFAULT_BUDGET) -> LayerPlacement:
    """The placement of one layer, each rank holding lo..hi experts (see the module docstring
    for what is optimised); `contiguous` is the naive placement, a start as well; `budget`
    bounds each branch and bound."""
    n, load, w = world_size, demand.load, demand.coactivation
    naive = None if contiguous is None else np.asarray(contiguous)
    if naive is not None:
        counts = np.bincount(naive, minlength=n)
        naive = naive if lo <= counts.min() and counts.max() <= hi else None
    balanced = [balanced_ranks(demand, n, lo, hi)]
    if naive is not None:
        balanced.append(balanced_ranks(demand, n, lo, hi, naive))
    least = min(float(_rank_loads(b, load, n).max()) for b in balanced)
    exact = min_max_load(load, n, lo, hi, least, budget)
    if exact.ranks is not None:
        balanced.append(balanced_ranks(demand, n, lo, hi, exact.ranks))
        least = min(least, float(_rank_loads(balanced[-1], load, n).max()))
    bound = least * (1.0 + tolerance)

    def fits(r: np.ndarray) -> bool:
        return float(_rank_loads(r, load, n).max()) <= bound + _EPS * max(1.0, bound)

    def key(r: np.ndarray) -> tuple[float, float, float]:
        rl = _rank_loads(r, load, n)
        return -round(kept_coactivation(r, w), 9), round(float(rl.max()), 9), round(float((rl**2).sum()), 9)

    candidates = [_search(s, demand, n, lo, hi, bound, "traffic") for s in ([] if naive is None else [naive]) + balanced
                  if fits(s)]
    best = min(candidates, key=key)  # the first (the contiguous start's) among equals
    traffic = max_kept(load, w, n, lo, hi, bound, kept_coactivation(best, w), budget)
    if traffic.ranks is not None:
        found = _search(traffic.ranks, demand, n, lo, hi, bound, "traffic")
        best = found if key(found) < key(best) else best
    return LayerPlacement([int(r) for r in best], least, exact.complete, traffic.complete)
