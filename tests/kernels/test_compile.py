"""`torch.compile` of a model with `SparseMoE`: same outputs and gradients as eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsify.moe import MoEConfig, Router, SparseMoE

from .cases import DEVICE, FAST_BACKENDS, Case, make_experts


class Block(nn.Module):
    """A residual block whose FFN is an MoE, as in an upcycled transformer."""

    def __init__(self, backend: str):
        super().__init__()
        case = Case("compile", 0, 4, 2, hidden=32, inter=64)
        self.norm = nn.LayerNorm(32)
        router = Router(32, MoEConfig(num_experts=4, top_k=2))
        nn.init.normal_(router.weight, std=0.5)
        self.moe = SparseMoE(router, make_experts(case), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


# Inductor for the backend "auto" picks on this device; the others through dynamo and AOTAutograd
# only ("aot_eager"), which is what they need from the compiler and keeps the test quick.
COMPILERS = {b: "inductor" if b == ("cpu" if DEVICE == "cpu" else "triton") else "aot_eager"
             for b in ["reference", *FAST_BACKENDS]}


@pytest.mark.parametrize("backend", list(COMPILERS))
def test_compiled_model_matches_eager(backend: str) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Block(backend).to(DEVICE)
    x = torch.randn(2, 5, 32, device=DEVICE)
    compiled = torch.compile(model, backend=COMPILERS[backend])
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference takes other paths through the backends
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
