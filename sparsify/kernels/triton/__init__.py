"""The `triton` backend: grouped-GEMM kernels for CUDA GPUs (ScatterMoE / fused_moe style).

- permute: the reference's (one stable sort and a binary search for the experts' offsets;
  nothing waits for the host); the kernels read the order directly, so no copy of the hidden
  states is made in expert order (unless the tuner finds that gathering the rows by a copy,
  to read them through a TMA descriptor, is faster on the GPU at hand).
- grouped_ffn / moe_ffn: the gather is fused into the first grouped GEMM together with the
  activation and the gate; the weighted scatter-combine is fused into the second.
- combine: inside `moe_ffn`'s second GEMM; the standalone op is the reference's index_add,
  which on a GPU is already one scatter kernel.

Autograd: backward kernels (`kernels.py`). On CPU the kernels run under Triton's interpreter when
`TRITON_INTERPRET=1` is set before triton is imported: slow, for testing only. Triton itself is
imported on first use, so sparsify works without it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..reference import combine, permute

__all__ = ["permute", "grouped_ffn", "combine", "moe_ffn", "supports"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INSTALLED = importlib.util.find_spec("triton") is not None


def supports(device: torch.device, dtype: torch.dtype, activation: str) -> str | None:
    """Why this backend cannot run an MoE layer on `device` in `dtype` (None when it can)."""
    if not _INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        from .tuning import interpreting

        if not interpreting():
            return "on CPU the triton kernels run only under Triton's interpreter (TRITON_INTERPRET=1), for testing"
    elif device.type != "cuda":
        return f"the triton kernels run on CUDA GPUs, not {device.type}"
    if dtype not in _DTYPES:
        return f"the triton kernels compute in float32, float16 or bfloat16, not {dtype}"
    from .activations import ACT_CODES

    if activation not in ACT_CODES:
        return f"activation {activation!r} has no triton implementation"
    return None


def moe_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, experts: torch.nn.Module) -> Tensor:
    """The fused MoE FFN of `x` [T, H] for (token, expert, weight) pairs."""
    from .ops import moe_ffn as fused

    return fused(x, token_idx, expert_idx, weight, experts)


def grouped_ffn(
    x: Tensor,
    counts: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    b3: Tensor | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Each expert's FFN on its segment of the grouped rows `x` (the reference's contract)."""
    from .ops import grouped_ffn as kernels

    return kernels(x, counts, w1, w2, w3, b1, b2, b3, activation, dropout, training)
