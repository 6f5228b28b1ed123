"""The `cpu` backend: the reference's algorithm, tuned for CPUs.

- permute: the reference's stable sort (a few thousand int64 keys; not worth more).
- grouped_ffn: expert segments spread over the cores, one single-threaded GEMM stream per core
  (see `pool`), outputs written into one preallocated buffer, activation in place, the routing
  weight applied inside the expert loop while the rows are in cache. Float32 inference runs on
  the backend's own AVX-512 GEMM (`native`, `native_ffn`: weights streamed with prefetching,
  gather and top-1 scatter inside the GEMM, torch's OpenMP threads), built on first use; where
  it cannot be built, on oneDNN/MKL.
- combine: a single index_add of the already weighted rows.
- moe_ffn in inference: the gather runs in the expert workers, and with top-1 routing (no token
  in two pairs) so does the combine: each weighted row is copied into its token's output row.

Autograd: forward and backward are custom ops with the same expert-parallel structure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...activations import PARAMETRISED
from ..reference import permute
from .grouped_ffn import gathered_ffn_inference, grouped_ffn
from .pool import expert_parallel_available

__all__ = ["permute", "grouped_ffn", "combine", "moe_ffn", "supports", "expert_parallel_available"]


def supports(device: torch.device, dtype: torch.dtype, activation: str) -> str | None:
    """Why this backend cannot run an MoE layer on `device` in `dtype` (None when it can)."""
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    if not dtype.is_floating_point:
        return f"the cpu backend computes in floating point, not {dtype}"
    if activation in PARAMETRISED:
        return f"the cpu backend has no parametrised activations ({activation})"
    return None


def combine(y: Tensor, token_idx: Tensor, weight: Tensor | None, num_tokens: int) -> Tensor:
    """Sum of `weight[p] * y[p]` into row `token_idx[p]` of a [num_tokens, H] output; with
    `weight=None` the rows are taken as already weighted (as `moe_ffn` leaves them)."""
    if weight is not None:
        y = y * weight.to(y.dtype).unsqueeze(-1)
    return y.new_zeros((num_tokens, y.shape[-1])).index_add_(0, token_idx, y)


def moe_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, experts: torch.nn.Module) -> Tensor:
    """The MoE FFN of `x` [T, H] for (token, expert, weight) pairs: permute, grouped FFN with the
    routing weight fused in, combine. In inference the gather runs in the expert workers too,
    and so does the combine when no token has two pairs (top-1 routing)."""
    order, counts = permute(expert_idx, experts.num_experts)
    tok, scale = token_idx[order], weight[order]
    e = experts
    tensors = (x, weight, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad and not (e.training and e.dropout > 0.0):
        unique = tok.numel() <= x.shape[0] and bool((torch.bincount(tok, minlength=x.shape[0]) <= 1).all())
        y = gathered_ffn_inference(x, tok, counts, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3, e.activation, scale,
                                   x.shape[0] if unique else -1)
        return y if unique else combine(y, tok, None, x.shape[0])
    y = grouped_ffn(
        x.index_select(0, tok), counts, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3,
        activation=e.activation, dropout=e.dropout, training=e.training, scale=scale,
    )
    return combine(y, tok, None, x.shape[0])
