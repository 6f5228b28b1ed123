"""`combine`: the weighted un-permute back to token order.

    out = combine(y, token_idx, weight, num_tokens, backend="cpu")

Row p of `y` [P, H] is pair p's expert output; `out[t] = sum of weight[p] * y[p] over the pairs
with token_idx[p] == t`, zero for tokens no pair names (dropped by a capacity). Differentiable.
The fused paths (`moe_ffn` of the cpu and triton backends) do this inside the grouped FFN.
"""

from __future__ import annotations

import torch

from .dispatch import get_backend

__all__ = ["combine"]


def combine(
    y: torch.Tensor, token_idx: torch.Tensor, weight: torch.Tensor, num_tokens: int, backend: str = "reference"
) -> torch.Tensor:
    """[num_tokens, H]: the pairs' weighted rows summed per token, computed by `backend`."""
    name = "reference" if backend == "auto" else backend
    return get_backend(name).combine(y, token_idx, weight, num_tokens)
