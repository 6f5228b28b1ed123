"""Routing problems and experts small enough for Triton's interpreter, and a runner that
returns a backend's output and gradients."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from sparsify.moe import Experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton is in the dev extra on Linux; elsewhere there is no wheel to test
_TRITON = ["triton"] if importlib.util.find_spec("triton") is not None else []
FAST_BACKENDS = ["cpu", *_TRITON] if DEVICE == "cpu" else _TRITON


@dataclass(frozen=True)
class Case:
    """A routing problem: `tokens` rows, pairs drawn by `loads`, an expert FFN of a given form."""

    name: str
    tokens: int
    experts: int
    k: int
    hidden: int = 32
    inter: int = 48  # not a multiple of the 32-wide test tiles: partial tiles are exercised
    form: str = "gated"
    activation: str = "silu"
    bias: tuple[bool, bool, bool] = (False, False, False)
    loads: str = "random"  # random | skewed | two-experts | dropped | none


CASES = [
    Case("top2-gated", 13, 4, 2),
    Case("top1-dense-bias", 9, 6, 1, form="dense", activation="relu", bias=(True, True, False)),
    Case("top4-gated-bias", 7, 8, 4, activation="gelu_tanh", bias=(True, True, True)),
    Case("one-token", 1, 4, 2),
    Case("empty-experts", 10, 8, 1, form="dense", activation="gelu", loads="two-experts"),
    Case("uneven", 40, 4, 2, loads="skewed"),
    Case("dropped-tokens", 12, 4, 2, loads="dropped"),
    Case("no-pairs", 5, 4, 1, loads="none"),
]


def make_experts(case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = DEVICE) -> Experts:
    """Experts of `case` with random weights (distinct per expert), on `device`."""
    g = torch.Generator().manual_seed(seed)
    ex = Experts(case.experts, case.hidden, case.inter, form=case.form, activation=case.activation, bias=case.bias)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return ex.to(device=device, dtype=dtype)


def make_pairs(case: Case, seed: int = 0, device: str = DEVICE
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [T, H], token_idx, expert_idx, weight) for `case` on `device`, top-k style: k-slot-major pairs."""
    g = torch.Generator().manual_seed(seed + 1)
    t, e, k = case.tokens, case.experts, case.k
    x = torch.randn(t, case.hidden, generator=g)
    logits = torch.randn(t, e, generator=g)
    if case.loads == "skewed":
        logits[:, 0] += 4.0  # almost every token's first choice is expert 0
    if case.loads == "two-experts":
        logits[:, [i for i in range(e) if i not in (1, 5)]] = -1e4
    weight, expert = logits.softmax(-1).topk(k, dim=-1)
    token_idx = torch.arange(t).repeat(k)
    expert_idx, weight = expert.t().reshape(-1), weight.t().reshape(-1)
    if case.loads == "dropped":  # a capacity dropped some pairs: tokens with 0, 1 or 2 pairs
        keep = torch.rand(t * k, generator=g) < 0.6
        token_idx, expert_idx, weight = token_idx[keep], expert_idx[keep], weight[keep]
    if case.loads == "none":
        token_idx, expert_idx, weight = token_idx[:0], expert_idx[:0], weight[:0]
    return tuple(v.to(device) for v in (x, token_idx, expert_idx, weight))


def run_moe(backend: str, experts: Experts, x, token_idx, expert_idx, weight, grad_seed: int = 2):
    """Output and gradients (x, weight, every parameter) of one backend's `moe_ffn`."""
    from sparsify.kernels import BACKENDS

    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = BACKENDS[backend].moe_ffn(x, token_idx, expert_idx, weight, experts)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    (y.float() * g.float()).sum().backward()
    leaves = {"x": x, "weight": weight, **dict(experts.named_parameters())}
    # a leaf the output does not depend on (no pairs at all) has no grad: it is zero
    grads = {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}
    return y.detach(), grads


def assert_matches_reference(backend: str, experts: Experts, *pairs, tol: float = 1e-5) -> None:
    """`backend`'s output and every gradient equal the reference backend's (float32: to `tol`)."""
    y_ref, g_ref = run_moe("reference", experts, *pairs)
    y, g = run_moe(backend, experts, *pairs)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=tol, atol=tol, msg=lambda m: f"grad {name}: {m}")


def assert_inference_matches_reference(backend: str, experts: Experts, *pairs, tol: float = 1e-5) -> None:
    """`backend`'s inference path (under inference mode) gives the reference backend's output."""
    from sparsify.kernels import BACKENDS

    with torch.inference_mode():
        y = BACKENDS[backend].moe_ffn(*pairs, experts)
        y_ref = BACKENDS["reference"].moe_ffn(*pairs, experts)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
