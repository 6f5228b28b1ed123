"""Branch and bound over one layer's placements: the proof (or improvement) behind the local search.

Both searches assign experts one at a time, heaviest first, to each rank that can take them, and
prune a branch as soon as it cannot beat the best placement known (the local search's, passed
in). Ranks are interchangeable, so of ranks with no expert yet only the first is tried. A search
that runs out of `budget` (visited branches) returns the best placement it met, so it never
makes a result worse; one that completes has proved its result optimal.

- `min_max_load`: the lowest possible load of the most loaded rank (makespan with at least
  `lo`, at most `hi` experts per rank).
- `max_kept`: the most co-activation kept inside ranks with no rank above `bound`; a branch's
  optimistic value counts every pair of experts not yet placed as kept, and each such expert's
  best affinity to a rank's placed experts.

Written by hand: this is a few dozen lines, and an integer-programming library (scipy's HiGHS,
OR-Tools) would be a large dependency with non-deterministic results under time limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["min_max_load", "max_kept", "SearchResult", "DEFAULT_BUDGET"]

DEFAULT_BUDGET = 20_000  # branches per search: proves optimality for 8 experts; bounded time for 256


@dataclass
class SearchResult:
    """The best placement found (None when nothing beat the known one) and whether the search
    completed, which proves that no placement beats `value`."""

    ranks: np.ndarray | None
    value: float
    complete: bool


class _OutOfBudget(Exception):
    pass


def _filling_ok(counts: list[int], lo: int, left: int) -> bool:
    """Whether `left` experts can still bring every rank to `lo`."""
    return sum(max(lo - c, 0) for c in counts) <= left


def min_max_load(load: np.ndarray, n: int, lo: int, hi: int, known: float, budget: int = DEFAULT_BUDGET) -> SearchResult:
    """A placement whose most loaded rank carries less than `known` (see the module docstring)."""
    e = len(load)
    order = sorted(range(e), key=lambda x: (-load[x], x))
    values = [float(load[x]) for x in order]
    rest = np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]]).tolist()  # load of order[k:]
    tol = 1e-9 * max(1.0, float(load.sum()))
    ranks, rl, counts = [-1] * e, [0.0] * n, [0] * n
    best_ranks, best_value, visited = None, known, 0

    def dfs(k: int) -> None:
        nonlocal best_ranks, best_value, visited
        visited += 1
        if visited > budget:
            raise _OutOfBudget
        if k == e:
            if max(rl) < best_value - tol:
                best_ranks, best_value = list(ranks), max(rl)
            return
        if max(max(rl), (sum(rl) + rest[k]) / n) >= best_value - tol:
            return
        x, v = order[k], values[k]
        tried = set()
        for r in sorted(range(n), key=lambda r: (rl[r], r)):
            state = (rl[r], counts[r])
            if counts[r] >= hi or state in tried or rl[r] + v >= best_value - tol:
                continue
            tried.add(state)  # ranks with equal load and count lead to the same placements
            counts[r] += 1
            if _filling_ok(counts, lo, e - k - 1):
                rl[r] += v
                ranks[x] = r
                dfs(k + 1)
                rl[r] -= v
            counts[r] -= 1
        ranks[x] = -1

    complete = True
    try:
        dfs(0)
    except _OutOfBudget:
        complete = False
    return SearchResult(None if best_ranks is None else np.array(best_ranks), float(best_value), complete)


def max_kept(load: np.ndarray, w: np.ndarray, n: int, lo: int, hi: int, bound: float, known: float,
             budget: int = DEFAULT_BUDGET) -> SearchResult:
    """A placement keeping more than `known` co-activation with no rank above `bound`."""
    e = len(load)
    order = sorted(range(e), key=lambda x: (-load[x], x))
    wl = w.tolist()
    # pairs among order[k:], all kept in the most optimistic case
    among = [0.0] * (e + 1)
    for k in range(e - 1, -1, -1):
        u = order[k]
        among[k] = among[k + 1] + sum(wl[u][v] for v in order[k + 1:])
    tol = 1e-9 * max(1.0, float(w.sum()))
    limit = bound + 1e-9 * max(1.0, bound)
    ranks, rl, counts = [-1] * e, [0.0] * n, [0] * n
    aff = [[0.0] * n for _ in range(e)]  # aff[u][r]: co-activation of u with rank r's placed experts
    best_ranks, best_value, visited = None, known, 0

    def dfs(k: int, kept: float) -> None:
        nonlocal best_ranks, best_value, visited
        visited += 1
        if visited > budget:
            raise _OutOfBudget
        if k == e:
            if kept > best_value + tol:
                best_ranks, best_value = list(ranks), kept
            return
        optimistic = kept + among[k] + sum(max(aff[u]) for u in order[k:])
        if optimistic <= best_value + tol:
            return
        x = order[k]
        v = float(load[x])
        empty_tried = False
        for r in sorted(range(n), key=lambda r: (-aff[x][r], rl[r], r)):
            if counts[r] >= hi or rl[r] + v > limit:
                continue
            if counts[r] == 0:
                if empty_tried:  # empty ranks are interchangeable
                    continue
                empty_tried = True
            counts[r] += 1
            if _filling_ok(counts, lo, e - k - 1):
                gain = aff[x][r]
                rl[r] += v
                ranks[x] = r
                for u in range(e):
                    aff[u][r] += wl[u][x]
                dfs(k + 1, kept + gain)
                for u in range(e):
                    aff[u][r] -= wl[u][x]
                rl[r] -= v
            counts[r] -= 1
        ranks[x] = -1

    complete = True
    try:
        dfs(0, 0.0)
    except _OutOfBudget:
        complete = False
    return SearchResult(None if best_ranks is None else np.array(best_ranks), float(best_value), complete)
