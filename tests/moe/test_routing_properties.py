"""Property tests of routing and dispatch (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsify.kernels import reference
from sparsify.moe import MoEConfig, Router

shapes = st.tuples(st.integers(1, 40), st.integers(2, 8), st.integers(1, 4), st.integers(0, 10_000))


def _router(e, k, seed, h=6, **kw):
    torch.manual_seed(seed)
    r = Router(h, MoEConfig(num_experts=e, top_k=min(k, e), **kw))
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    return r, torch.randn(0, h)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_dropless_computes_every_pair_exactly_once(shape):
    t, e, k, seed = shape
    r, _ = _router(e, k, seed)
    routing = r(torch.randn(t, 6))
    k = min(k, e)
    assert routing.token_idx.numel() == t * k
    pairs = set(zip(routing.token_idx.tolist(), routing.expert_idx.tolist()))
    assert len(pairs) == t * k  # no (token, expert) pair twice, none missing
    counts = torch.bincount(routing.token_idx, minlength=t)
    assert (counts == k).all()


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_normalised_weights_sum_to_one(shape):
    t, e, k, seed = shape
    r, _ = _router(e, k, seed)
    routing = r(torch.randn(t, 6))
    sums = torch.zeros(t, dtype=torch.float32).index_add(0, routing.token_idx, routing.weight)
    assert torch.allclose(sums, torch.ones(t), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_permutation_round_trips(shape):
    t, e, k, seed = shape
    r, _ = _router(e, k, seed)
    x = torch.randn(t, 6)
    routing = r(x)
    order, counts = reference.permute(routing.expert_idx, e)
    assert counts.sum() == routing.expert_idx.numel()
    sorted_experts = routing.expert_idx[order]
    assert (sorted_experts[1:] >= sorted_experts[:-1]).all()
    # identity experts with unit weights: combine(permute(x)) == k * x
    rows = x[routing.token_idx[order]]
    back = reference.combine(rows, routing.token_idx[order], torch.ones(order.numel()), t)
    assert torch.allclose(back, k * x if k <= e else e * x, atol=1e-6)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    assert torch.equal(routing.expert_idx[order][inverse], routing.expert_idx)


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0.1, 2.0))
def test_capacity_is_never_exceeded(shape, cf):
    t, e, k, seed = shape
    r, _ = _router(e, k, seed, capacity_factor=cf)
    routing = r(torch.randn(t, 6))
    capacity = math.ceil(cf * t * min(k, e) / e)
    assert torch.bincount(routing.expert_idx, minlength=e).max() <= capacity


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_expert_choice_gives_each_expert_its_capacity(shape):
    t, e, k, seed = shape
    r, _ = _router(e, k, seed, router="expert-choice")
    routing = r(torch.randn(t, 6))
    per_expert = torch.bincount(routing.expert_idx, minlength=e)
    assert (per_expert == per_expert[0]).all() and per_expert[0] <= t


def test_aux_losses_are_recorded_with_grad():
    r, _ = _router(4, 2, 0)
    x = torch.randn(32, 6, requires_grad=True)
    r(x)
    lb, z = r.aux["load_balancing"], r.aux["z_loss"]
    assert lb.requires_grad and z.requires_grad
    assert lb.item() >= 1.0 - 1e-5  # E * sum f_i P_i is minimal (1) at perfect balance
    (lb + z).backward()
    assert r.weight.grad is not None
