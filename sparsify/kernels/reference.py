"""The reference backend: plain torch, the oracle that every other backend is tested against.

Token dispatch works on flat (token, expert, weight) pairs, which covers top-k routing
(k pairs per token) and expert choice (a variable number per token) alike:

1. `permute`: stable sort of the pairs by expert; per-expert counts. Nothing here waits for the
   device (bincount would read the largest expert id back to the host), so every backend and
   the router use these helpers.
2. `grouped_ffn`: each expert's FFN on its contiguous segment of gathered rows.
3. `combine`: weight each row and add it back into its token's output (index_add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import get_activation

__all__ = ["permute", "expert_counts", "sorted_offsets", "offsets_of", "grouped_ffn", "combine", "moe_ffn", "supports"]


def supports(device: torch.device, dtype: torch.dtype, activation: str) -> str | None:
    """Why this backend cannot run an MoE layer (None: it runs anywhere torch does)."""
    return None


def expert_counts(expert_idx: torch.Tensor, num_experts: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pairs per expert (a scatter-add), in `dtype` (default: the ids' dtype)."""
    counts = torch.zeros(num_experts, dtype=dtype or expert_idx.dtype, device=expert_idx.device)
    return counts.index_add_(0, expert_idx, torch.ones_like(expert_idx, dtype=counts.dtype))


def sorted_offsets(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups the pairs by expert, and the [E + 1] row offsets of the experts'
    segments in that order: one sort, then a binary search of each expert id in the sorted ids."""
    ids, order = torch.sort(expert_idx, stable=True)
    bounds = torch.arange(num_experts + 1, device=expert_idx.device, dtype=ids.dtype)
    return order, torch.searchsorted(ids, bounds)


def offsets_of(counts: torch.Tensor) -> torch.Tensor:
    """[E + 1] row offsets of the experts' segments: 0, then the running sum of `counts`."""
    offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def permute(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups the pairs by expert, and the number of pairs per expert."""
    order, offsets = sorted_offsets(expert_idx, num_experts)
    return order, offsets.diff()


def grouped_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    b3: torch.Tensor | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Rows of `x` grouped by expert (`counts[e]` rows for expert e) through each expert's FFN.

    Weights are stacked [E, out, in]: w1 [E, I, H], w2 [E, H, I], w3 [E, I, H] (gated form only).
    """
    act = get_activation(activation)
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        seg = x[start : start + n]
        start += n
        h = F.linear(seg, w1[e], None if b1 is None else b1[e])
        h = act(h)
        if w3 is not None:
            h = h * F.linear(seg, w3[e], None if b3 is None else b3[e])
        if dropout > 0.0 and training:
            h = F.dropout(h, dropout, training=True)
        outs.append(F.linear(h, w2[e], None if b2 is None else b2[e]))
    if not outs:
        return x.new_zeros((0, w2.shape[1]))
    return torch.cat(outs, dim=0)


def combine(
    y: torch.Tensor, token_idx: torch.Tensor, weight: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Sum of `weight[p] * y[p]` into row `token_idx[p]` of a [num_tokens, H] output."""
    out = y.new_zeros((num_tokens, y.shape[-1]))
    return out.index_add(0, token_idx, y * weight.to(y.dtype).unsqueeze(-1))


def moe_ffn(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weight: torch.Tensor,
            experts: torch.nn.Module) -> torch.Tensor:
    """The MoE FFN of `x` [T, H] for (token, expert, weight) pairs: permute, gather, grouped FFN,
    combine, in plain torch (autograd comes from torch)."""
    order, counts = permute(expert_idx, experts.num_experts)
    tok_sorted = token_idx[order]
    y = grouped_ffn(
        x[tok_sorted], counts, experts.w1, experts.w2, experts.w3, experts.b1, experts.b2, experts.b3,
        activation=experts.activation_fn, dropout=experts.dropout, training=experts.training,
    )
    return combine(y, tok_sorted, weight[order], x.shape[0])
