"""Permute for the triton backend: the order that groups (token, expert) pairs by expert, and
the experts' row offsets the grouped-GEMM kernels read.

Nothing here waits for the GPU (bincount would read the largest expert id back to the host), and
few kernels are launched: at decode sizes every launch costs about as much as the work.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["permute", "offsets_of", "sorted_offsets"]


def sorted_offsets(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable order that groups the pairs by expert, and the [E + 1] row offsets of the experts'
    segments in that order: one sort, then a binary search of each expert id in the sorted ids."""
    ids, order = torch.sort(expert_idx, stable=True)
    bounds = torch.arange(num_experts + 1, device=expert_idx.device, dtype=ids.dtype)
    return order, torch.searchsorted(ids, bounds)


def permute(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable order that groups the pairs by expert, and the number of pairs per expert."""
    order, offsets = sorted_offsets(expert_idx, num_experts)
    return order, offsets.diff()


def offsets_of(counts: Tensor) -> Tensor:
    """[E + 1] row offsets of the experts' segments: 0, then the running sum of `counts`."""
    offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets
