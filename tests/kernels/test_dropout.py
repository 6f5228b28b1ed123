"""Hidden dropout in training: the fused backends draw `hidden_dropout_mask` and apply it exactly.

The mask comes from torch's generator, so re-seeding and drawing it again gives the mask a
backend used; the expected output and gradients are then plain torch with that mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify.activations import get_activation
from sparsify.kernels import BACKENDS, permute
from sparsify.kernels.dropout import hidden_dropout_mask

from .cases import CASES, FAST_BACKENDS, make_experts, make_pairs

P = 0.3


def _masked_reference(x, token_idx, expert_idx, weight, experts, mask):
    """The MoE FFN in plain torch with a given hidden mask (rows in expert-sorted order)."""
    order, counts = permute(expert_idx, experts.num_experts)
    tok = token_idx[order]
    act, out, start = get_activation(experts.activation), [], 0
    for e, n in enumerate(counts.tolist()):
        seg = x[tok[start:start + n]]
        h = act(F.linear(seg, experts.w1[e], None if experts.b1 is None else experts.b1[e]))
        if experts.w3 is not None:
            h = h * F.linear(seg, experts.w3[e], None if experts.b3 is None else experts.b3[e])
        h = h * mask[start:start + n]
        out.append(F.linear(h, experts.w2[e], None if experts.b2 is None else experts.b2[e]))
        start += n
    y = torch.cat(out) * weight[order].unsqueeze(-1)
    return x.new_zeros(x.shape).index_add(0, tok, y)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=lambda c: c.name)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dropout_mask_applied_forward_and_backward(backend: str, case) -> None:
    experts = make_experts(case)
    experts.dropout = P
    experts.train()
    x, tok, exp, w = make_pairs(case)
    results = []
    for run in ("backend", "expected"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        if run == "backend":
            y = BACKENDS[backend].moe_ffn(xx, tok, exp, ww, experts)
        else:
            mask = hidden_dropout_mask(tok.numel(), case.inter, P, x)
            assert 0.5 < (mask == 0).float().mean().item() / P < 1.5  # about P of the units dropped
            y = _masked_reference(xx, tok, exp, ww, experts, mask)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
        results.append([y.detach(), xx.grad, ww.grad, *(p.grad for p in experts.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dropout_off_in_eval(backend: str) -> None:
    case = CASES[0]
    experts = make_experts(case)
    experts.dropout = P
    experts.eval()
    pairs = make_pairs(case)
    torch.testing.assert_close(BACKENDS[backend].moe_ffn(*pairs, experts),
                               BACKENDS["reference"].moe_ffn(*pairs, experts), rtol=1e-5, atol=1e-5)
