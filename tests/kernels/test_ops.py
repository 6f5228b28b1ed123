"""The op-level API, `permute`, `grouped_ffn`, `combine`, backend by backend against the reference."""

from __future__ import annotations

import pytest
import torch

from sparsify.activations import ACTIVATIONS
from sparsify.errors import OptionError
from sparsify.kernels import combine, grouped_ffn, moe_ffn, permute

from .cases import CASES, DEVICE, FAST_BACKENDS, Case, make_experts, make_pairs, run_moe


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_permute_is_a_stable_sort_by_expert(backend: str) -> None:
    expert_idx = torch.tensor([3, 0, 3, 1, 0, 3, 3], device=DEVICE)
    order, counts = permute(expert_idx, 5, backend=backend)
    assert order.tolist() == [1, 4, 3, 0, 2, 5, 6]
    assert counts.tolist() == [2, 1, 0, 4, 0]


def _grouped_inputs(case: Case):
    x, _, expert_idx, _ = make_pairs(case)
    order, counts = permute(expert_idx, case.experts)
    rows = torch.randn(order.numel(), case.hidden, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return rows, counts


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("top4-gated-bias", "empty-experts", "no-pairs")],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_grouped_ffn_equals_reference(backend: str, case: Case) -> None:
    experts = make_experts(case)
    rows, counts = _grouped_inputs(case)
    results = {}
    for name in ("reference", backend):
        x = rows.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        y = grouped_ffn(x, counts, experts.w1, experts.w2, experts.w3, experts.b1, experts.b2, experts.b3,
                        activation=experts.activation, backend=name)
        if y.numel():
            y.sum().backward()
        zero = torch.zeros_like
        grads = [zero(t) if t.grad is None else t.grad for t in (x, *experts.parameters())]
        results[name] = (y.detach(), grads)
    (y_ref, g_ref), (y, g) = results["reference"], results[backend]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_combine_equals_reference(backend: str) -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.randn(9, 6, generator=g).to(DEVICE)
    token_idx = torch.tensor([0, 2, 2, 4, 0, 1, 4, 4, 2], device=DEVICE)  # token 3 gets nothing
    weight = torch.rand(9, generator=g).to(DEVICE)
    out = combine(y, token_idx, weight, 5, backend=backend)
    torch.testing.assert_close(out, combine(y, token_idx, weight, 5), rtol=1e-6, atol=1e-6)
    assert out[3].abs().max() == 0


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("form", ["dense", "gated"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_every_activation(backend: str, form: str, activation: str) -> None:
    """Forward and backward of every activation sparsify knows, in both FFN forms."""
    case = Case(f"{form}-{activation}", 6, 4, 2, hidden=16, inter=32, form=form, activation=activation,
                bias=(True, True, form == "gated"))
    experts = make_experts(case)
    pairs = make_pairs(case)
    y_ref, g_ref = run_moe("reference", experts, *pairs)
    y, g = run_moe(backend, experts, *pairs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_unknown_backend_is_an_option_error() -> None:
    case = CASES[0]
    with pytest.raises(OptionError, match="unknown kernel backend 'fast'.*auto, reference, cpu, triton"):
        moe_ffn(*make_pairs(case), make_experts(case), backend="fast")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-only refusal of the triton backend")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    case = CASES[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(OptionError, match="TRITON_INTERPRET=1|triton is not installed"):
        moe_ffn(*make_pairs(case), make_experts(case), backend="triton")


def test_auto_runs_the_device_backend() -> None:
    case = CASES[0]
    experts, pairs = make_experts(case), make_pairs(case)
    torch.testing.assert_close(moe_ffn(*pairs, experts, backend="auto"), moe_ffn(*pairs, experts), rtol=1e-5, atol=1e-5)
