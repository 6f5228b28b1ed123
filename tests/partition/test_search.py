"""The per-layer placement search against every placement there is: its balance is optimal, it
keeps the most co-activation any placement within the balance bound keeps, and so never plans
more traffic than the contiguous placement when that one balances within the tolerance.
Routing statistics are built by construction (tokens choosing experts, counted by `LayerStats`),
fuzzed with hypothesis."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparsify.partition.exact import max_kept, min_max_load
from sparsify.partition.metrics import LayerDemand, layer_metrics
from sparsify.partition.placement import contiguous_ranks
from sparsify.partition.search import kept_coactivation, place_layer
from sparsify.partition.stats import LayerStats

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def demand_of(choices: np.ndarray, experts: int, top_k: int) -> LayerDemand:
    """The demand `sparsify profile` records when token t chooses experts choices[t]."""
    stats = LayerStats.empty(experts)
    tokens = torch.arange(len(choices)).repeat_interleave(top_k)
    stats.add(tokens, torch.from_numpy(choices.reshape(-1)), len(choices))
    return LayerDemand.from_stats(stats, top_k)


@st.composite
def routing(draw, experts: list[int]) -> LayerDemand:
    """Skewed expert popularity, and for some profiles a hidden pairing of experts that tokens
    choose together (as routers that co-select experts do)."""
    e = draw(st.sampled_from(experts))
    k = draw(st.sampled_from([2, 2, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = draw(st.integers(20, 400))
    popularity = rng.dirichlet(np.full(e, draw(st.sampled_from([0.3, 1.0, 5.0, 1000.0]))))
    paired = draw(st.floats(0.0, 1.0))  # share of tokens that choose a pair of the hidden pairing
    partner = rng.permutation(e).reshape(-1, 2)
    rows = []
    for _ in range(tokens):
        if k == 2 and rng.random() < paired:
            rows.append(partner[rng.choice(len(partner), p=popularity[partner[:, 0]] / popularity[partner[:, 0]].sum())])
        else:
            rows.append(rng.choice(e, k, replace=False, p=popularity))
    return demand_of(np.array(rows), e, k)


def layout(draw, e: int) -> tuple[int, int, int]:
    """(world size, fewest, most experts per rank): equal counts, or uneven ones."""
    if draw(st.booleans()):
        n = draw(st.sampled_from([d for d in range(2, e) if e % d == 0]))
        return n, e // n, e // n
    n = draw(st.integers(2, min(4, e - 1)))
    return n, 1, e - n + 1


def every_placement(e: int, n: int, lo: int, hi: int) -> np.ndarray:
    """All assignments of e experts to n ranks with lo..hi experts on each: [P, e]."""
    ranks = np.array(list(itertools.product(range(n), repeat=e)))
    counts = np.stack([(ranks == r).sum(axis=1) for r in range(n)], axis=1)
    return ranks[((counts >= lo) & (counts <= hi)).all(axis=1)]


def exhaustive(demand: LayerDemand, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(max rank load, co-activation kept) of every placement."""
    ranks = every_placement(len(demand.load), n, lo, hi)
    onehot = np.eye(n)[ranks]  # [P, E, N]
    loads = np.einsum("pen,e->pn", onehot, demand.load).max(axis=1)
    same = np.einsum("pen,pfn->pef", onehot, onehot)
    return loads, (same * demand.coactivation).sum(axis=(1, 2)) / 2


def _max_load(ranks, demand: LayerDemand, n: int) -> float:
    return float(np.bincount(np.asarray(ranks), weights=demand.load, minlength=n).max())


@FUZZ
@given(data=st.data())
def test_balance_and_co_activation_are_the_best_any_placement_reaches(data):
    demand = data.draw(routing([4, 6, 8]))
    e = len(demand.load)
    n, lo, hi = layout(data.draw, e)
    tolerance = data.draw(st.sampled_from([0.0, 0.01, 0.1]))
    placed = place_layer(demand, n, lo, hi, tolerance, contiguous_ranks(e, n))
    loads, kept = exhaustive(demand, n, lo, hi)
    best = loads.min()
    assert placed.balance_optimal and placed.traffic_optimal  # the branch and bound completed
    assert placed.best_max_load == pytest.approx(best, rel=1e-9)
    bound = best * (1 + tolerance)
    assert _max_load(placed.ranks, demand, n) <= bound * (1 + 1e-9)
    most = kept[loads <= bound * (1 + 1e-9)].max()
    assert kept_coactivation(np.array(placed.ranks), demand.coactivation) == pytest.approx(most, rel=1e-9, abs=1e-9)
    counts = np.bincount(placed.ranks, minlength=n)
    assert counts.min() >= lo and counts.max() <= hi


@settings(FUZZ, max_examples=40)  # layers of up to 32 experts: slower examples
@given(data=st.data())
def test_traffic_is_at_most_contiguous_whenever_contiguous_balances_within_the_tolerance(data):
    """The property the README states, at sizes past exhaustive search (the report's figures)."""
    demand = data.draw(routing([8, 16, 32]))
    e = len(demand.load)
    n = data.draw(st.sampled_from([d for d in (2, 4, 8) if d < e]))
    naive = contiguous_ranks(e, n)
    tolerance = data.draw(st.sampled_from([0.0, 0.01, 0.05, "contiguous's"]))
    if tolerance == "contiguous's":  # the least at which the contiguous placement is within the bound
        best = place_layer(demand, n, e // n, e // n, 0.0, naive).best_max_load
        tolerance = max(0.0, _max_load(naive, demand, n) / best - 1)
    placed = place_layer(demand, n, e // n, e // n, tolerance, naive)
    planned, contiguous = (layer_metrics(r, demand, n, 64, 4) for r in (placed.ranks, naive))
    bound = placed.best_max_load * (1 + tolerance)
    assert _max_load(placed.ranks, demand, n) <= bound * (1 + 1e-9)
    within = _max_load(naive, demand, n) <= bound * (1 + 1e-9)
    event(f"contiguous within the bound: {within}")
    if within:
        assert planned["a2a_bytes_per_token"] <= contiguous["a2a_bytes_per_token"]
        assert planned["coactivation_kept"] >= contiguous["coactivation_kept"] - 1e-6


@FUZZ
@given(data=st.data())
def test_branch_and_bound_alone_finds_the_optimum(data):
    """Started from nothing better than a trivial bound, so the local search cannot hide a miss."""
    demand = data.draw(routing([4, 6, 8]))
    e = len(demand.load)
    n, lo, hi = layout(data.draw, e)
    loads, kept = exhaustive(demand, n, lo, hi)
    balance = min_max_load(demand.load, n, lo, hi, float(demand.load.sum()) + 1)
    assert balance.complete and balance.value == pytest.approx(loads.min())
    assert _max_load(balance.ranks, demand, n) == pytest.approx(balance.value)
    bound = data.draw(st.floats(float(loads.min()), float(demand.load.sum())))
    traffic = max_kept(demand.load, demand.coactivation, n, lo, hi, bound, -1.0)
    assert traffic.complete and traffic.value == pytest.approx(kept[loads <= bound * (1 + 1e-9)].max(), abs=1e-9)
    assert _max_load(traffic.ranks, demand, n) <= bound * (1 + 1e-9)


@FUZZ
@given(data=st.data())
def test_out_of_budget_search_never_returns_worse(data):
    """A branch and bound cut short returns nothing, or a valid placement better than the known."""
    demand = data.draw(routing([8]))
    n, lo, hi = layout(data.draw, 8)
    budget = data.draw(st.integers(1, 60))
    known_load = float(demand.load.sum())  # any placement is at most this
    found = min_max_load(demand.load, n, lo, hi, known_load, budget)
    if found.ranks is not None:
        counts = np.bincount(found.ranks, minlength=n)
        assert counts.min() >= lo and counts.max() <= hi
        assert _max_load(found.ranks, demand, n) == pytest.approx(found.value) and found.value < known_load
    bound = float(demand.load.sum())
    found = max_kept(demand.load, demand.coactivation, n, lo, hi, bound, 0.0, budget)
    if found.ranks is not None:
        assert kept_coactivation(found.ranks, demand.coactivation) == pytest.approx(found.value) and found.value > 0


def test_co_selected_pairs_are_placed_together_when_balance_allows():
    # 16 experts in pairs (i, i+8) that tokens always choose together, pairs equally popular:
    # every placement with 4 experts per rank balances alike, so the pairs share ranks
    pairs = np.array([[i, i + 8] for i in range(8)] * 50)
    demand = demand_of(pairs, 16, 2)
    placed = place_layer(demand, 4, 4, 4, 0.0, contiguous_ranks(16, 4))
    assert all(placed.ranks[i] == placed.ranks[i + 8] for i in range(8))
    planned, naive = (layer_metrics(r, demand, 4, 64, 4) for r in (placed.ranks, contiguous_ranks(16, 4)))
    assert planned["ranks_per_token"] == 1.0 and naive["ranks_per_token"] == 2.0
    assert planned["imbalance"] == naive["imbalance"] == 1.0


def test_large_layers_stay_bounded():
    """128 experts on 16 ranks: the branch and bound stops at its budget; the result is valid and
    at least as good as the contiguous placement on both balance and traffic here."""
    rng = np.random.default_rng(0)
    partner = rng.permutation(128).reshape(-1, 2)
    demand = demand_of(partner[rng.integers(0, 64, 3000)], 128, 2)
    naive = contiguous_ranks(128, 16)
    placed = place_layer(demand, 16, 8, 8, 0.01, naive)
    assert not placed.traffic_optimal
    planned, contiguous = (layer_metrics(r, demand, 16, 64, 4) for r in (placed.ranks, naive))
    assert planned["imbalance"] <= contiguous["imbalance"]
    assert planned["a2a_bytes_per_token"] < contiguous["a2a_bytes_per_token"]
