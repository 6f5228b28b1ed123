"""The placement planner: balance, co-activation, memory and world-size rules, the pass; on a real
model whose routers co-select expert pairs, less traffic than the contiguous placement."""

from __future__ import annotations

import pytest
import torch

from sparsify.errors import OptionError, PlanError
from sparsify.partition.memory import Footprint, format_bytes, parse_memory
from sparsify.partition.placement import ExpertPlacement
from sparsify.partition.planner import plan_placement
from sparsify.partition.stats import LayerStats, RoutingStats
from sparsify.plan import ExpertInit, FFNSite, LayerPlan, UpcyclePlan
from sparsify.moe import MoEConfig

E = 8
LAYERS = ["enc.1.mlp", "enc.3.mlp"]


def toy_plan(experts: int = E) -> UpcyclePlan:
    sites = [FFNSite(p, "dense", "relu", 64, 128, {"w1": f"{p}.wi.weight", "w2": f"{p}.wo.weight"}, index=i)
             for i, p in enumerate(LAYERS)]
    moe = MoEConfig(num_experts=experts, top_k=2)
    return UpcyclePlan(sites=sites, selected=list(LAYERS),
                       layers={p: LayerPlan(moe, [ExpertInit()] * experts) for p in LAYERS})


def footprint(replicated: int = 1000, per_expert: int = 100) -> Footprint:
    return Footprint(replicated, {p: per_expert for p in LAYERS}, 4)


def routed_stats(choices: list[tuple[int, int]], experts: int = E) -> RoutingStats:
    """Stats counted from real routing pairs: token t chose experts choices[t]."""
    stats = RoutingStats(experts, 2, {p: LayerStats.empty(experts) for p in LAYERS}, {"source": "test"})
    tokens = torch.arange(len(choices)).repeat(2)
    chosen = torch.tensor(choices).t().reshape(-1)
    for layer in stats.layers.values():
        layer.add(tokens, chosen, len(choices))
    return stats


def zipf_stats(seed: int = 0, tokens: int = 4000, experts: int = E) -> RoutingStats:
    """Skewed top-2 routing: expert e is chosen with probability ~ 1/(e+1)."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
    picks = torch.stack([torch.multinomial(p, 2, generator=g) for _ in range(tokens)])
    return routed_stats([tuple(r) for r in picks.tolist()], experts)


def test_stats_count_tokens_and_pairs():
    s = routed_stats([(0, 1), (0, 1), (2, 5)]).layers[LAYERS[0]]
    assert s.tokens == 3 and s.expert_tokens == [2, 2, 1, 0, 0, 1, 0, 0]
    assert s.coactivation[0][1] == s.coactivation[1][0] == 2 and s.coactivation[2][5] == 1
    assert [s.coactivation[i][i] for i in range(E)] == s.expert_tokens


@pytest.mark.parametrize("world_size,equal", [(2, True), (4, True), (4, False), (3, False)])
def test_skewed_load_is_balanced_better_than_contiguous(world_size, equal):
    placement = plan_placement(toy_plan(), world_size, footprint(), zipf_stats(), equal_experts=equal)
    rep = placement.report
    assert rep["imbalance"] < rep["contiguous_imbalance"]
    for layer in rep["layers"].values():
        assert layer["imbalance"] <= layer["contiguous"]["imbalance"]
        assert abs(sum(layer["load_per_rank"]) - 1) < 1e-4
        if equal:
            assert layer["experts_per_rank"] == [E // world_size] * world_size
    assert ExpertPlacement.from_dict(placement.to_dict()).layers == placement.layers


def test_uneven_counts_balance_a_dominant_expert():
    # Expert 0 takes half of all assignments: alone on a rank it is as balanced as possible.
    choices = [(0, 1 + t % 7) for t in range(700)]
    placement = plan_placement(toy_plan(), 2, footprint(), routed_stats(choices), equal_experts=False)
    ranks = placement.layers[LAYERS[0]]
    assert placement.counts(LAYERS[0]) in ([1, 7], [7, 1])
    assert ranks.count(ranks[0]) == 1 and placement.report["imbalance"] == pytest.approx(1.0)


def test_co_chosen_experts_share_a_rank_when_load_allows():
    # Equal loads; pairs (0,5) (1,4) (2,7) (3,6) always chosen together.
    pairs = [(0, 5), (1, 4), (2, 7), (3, 6)] * 100
    placement = plan_placement(toy_plan(), 4, footprint(), routed_stats(pairs))
    ranks = placement.layers[LAYERS[0]]
    assert all(ranks[a] == ranks[b] for a, b in pairs[:4])
    layer = placement.report["layers"][LAYERS[0]]
    assert layer["coactivation_kept"] == 1.0 and layer["contiguous"]["coactivation_kept"] == 0.0
    assert layer["ranks_per_token"] == 1.0 and layer["contiguous"]["ranks_per_token"] == 2.0
    assert placement.report["a2a_bytes_per_token"] < placement.report["contiguous_a2a_bytes_per_token"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_routers_that_co_select_pairs_get_less_traffic(plans, world_size):
    """demo:t5 upcycled, its routers choosing experts i and i + 4 together (pairs the contiguous
    placement splits), profiled on the demo text as `sparsify profile` does."""
    from partition_workers import pair_routers

    from sparsify.io.demo import build_demo
    from sparsify.partition.calibration import DEMO_TEXT, calibration_batches, token_ids
    from sparsify.partition.profile import profile_routing
    from sparsify.rewrite import apply_plan

    plan = UpcyclePlan.from_dict(plans["t5"])
    model = pair_routers(apply_plan(build_demo("t5"), plan)).eval()
    ids = token_ids(DEMO_TEXT, None, model.config.vocab_size)
    stats = profile_routing(model, calibration_batches(model, ids, seq_len=64), {"source": "demo-text"})
    for s in stats.layers.values():  # the routing really is by pairs
        assert sum(s.coactivation[i][i + 4] for i in range(4)) >= 0.95 * s.tokens
    fp = Footprint(1000, {p: 100 for p in plan.selected}, 4)
    rep = plan_placement(plan, world_size, fp, stats).report
    assert rep["a2a_bytes_per_token"] < rep["contiguous_a2a_bytes_per_token"]
    for layer in rep["layers"].values():
        bound = layer["best_imbalance"] * 1.01 + 1e-6  # the default tolerance
        assert layer["imbalance"] <= bound
        if layer["contiguous"]["imbalance"] <= bound:
            assert layer["a2a_bytes_per_token"] <= layer["contiguous"]["a2a_bytes_per_token"]


def test_without_stats_the_contiguous_placement_is_kept():
    placement = plan_placement(toy_plan(), 4, footprint())
    assert placement.layers[LAYERS[0]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert placement.report["imbalance"] == placement.report["contiguous_imbalance"] == 1.0


def test_memory_limits_experts_per_rank():
    fp = footprint(replicated=1000, per_expert=100)  # an expert of each of 2 layers: 200 bytes
    placement = plan_placement(toy_plan(), 2, fp, zipf_stats(), memory_per_rank=1000 + 5 * 200, equal_experts=False)
    assert max(placement.counts(LAYERS[0])) <= 5
    assert max(placement.report["memory_per_rank"]) <= 2000


@pytest.mark.parametrize("world_size,memory,equal,message", [
    (3, None, True, "--world-size 3 does not divide the 8 experts"),
    (16, None, False, "exceeds the 8 experts"),
    (0, None, True, "must be 1 or more"),
    (4, 1000 + 2 * 200 - 1, True, "too small for any placement"),
    (4, 500, False, "too small for any placement"),
])
def test_impossible_requests_are_one_line_errors(world_size, memory, equal, message):
    with pytest.raises(OptionError, match=message) as err:
        plan_placement(toy_plan(), world_size, footprint(), memory_per_rank=memory, equal_experts=equal)
    assert "\n" not in str(err.value)


def test_stats_of_another_model_are_refused():
    other = zipf_stats(experts=4)
    with pytest.raises(PlanError, match="4 experts per layer"):
        plan_placement(toy_plan(), 2, footprint(), other)
    renamed = zipf_stats()
    renamed.layers["dec.1.mlp"] = renamed.layers.pop(LAYERS[1])
    with pytest.raises(PlanError, match="lack MoE layer 'enc.3.mlp'"):
        plan_placement(toy_plan(), 2, footprint(), renamed)


@pytest.mark.parametrize("data,message", [
    ({"format": "nope"}, "not an expert placement"),
    ({"format": "sparsify-expert-placement", "world_size": 2, "num_experts": 8, "layers": {"a": [0] * 7}}, "places 7 experts"),
    ({"format": "sparsify-expert-placement", "world_size": 2, "num_experts": 8, "layers": {"a": [0] * 8}}, "leaves rank 1 without"),
    ({"format": "sparsify-expert-placement", "world_size": 2, "num_experts": 8, "layers": {"a": [0, 1] * 3 + [5, 0]}}, "outside 0..1"),
])
def test_bad_placements_are_refused(data, message):
    with pytest.raises(PlanError, match=message):
        ExpertPlacement.from_dict(data)


def test_placement_must_match_the_model():
    placement = ExpertPlacement.contiguous(["enc.1.mlp", "somewhere.else"], E, 2)
    with pytest.raises(PlanError, match="'somewhere.else', which is not an MoE layer"):
        placement.check_matches(toy_plan())
    with pytest.raises(PlanError, match="for 2 ranks but the process group has 4"):
        ExpertPlacement.contiguous(LAYERS, E, 2).check_matches(toy_plan(), world_size=4)


@pytest.mark.parametrize("text,value", [("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("512 MB", 512 * 10**6), ("1.5kb", 1500), ("123", 123)])
def test_memory_sizes(text, value):
    assert parse_memory(text) == value
    assert format_bytes(value)


@pytest.mark.parametrize("text", ["lots", "-1GB", "80XB", ""])
def test_bad_memory_sizes(text):
    with pytest.raises(OptionError, match="--memory-per-rank takes a size"):
        parse_memory(text)


def test_partition_experts_pass_in_a_pipeline(demo):
    from sparsify.passes import FindFFN, PartitionExperts, PassManager, SelectLayers, UpcycleFFN

    model = demo("gpt2")
    result = PassManager([FindFFN(), SelectLayers(every=2), UpcycleFFN(experts=4), PartitionExperts(world_size=2)]).run(model)
    placement = result.model.sparsify_placement
    assert set(placement.layers) == set(result.plan.selected)
    assert placement.report["replicated_bytes"] > 0
    assert len(set(placement.report["memory_per_rank"])) == 1
    with pytest.raises(OptionError, match="too small"):
        PassManager([PartitionExperts(world_size=2, memory_per_rank="1KB")]).run(result.model, plan=result.plan)
