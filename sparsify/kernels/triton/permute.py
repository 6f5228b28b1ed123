"""Permute for the triton backend, and the block schedule the grouped-GEMM kernels run on.

Nothing here waits for the GPU: counts come from a scatter-add (bincount would read the largest
expert id back to the host), and the block table has a static length, so the host can queue
the kernels while the router is still running.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["permute", "offsets_of", "block_table"]


def permute(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable order that groups the pairs by expert, and the number of pairs per expert."""
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_idx.device)
    return order, counts.index_add_(0, expert_idx, torch.ones_like(expert_idx))


def offsets_of(counts: Tensor) -> Tensor:
    """[E + 1] row offsets of the experts' segments: 0, then the running sum of `counts`."""
    offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def block_table(counts: Tensor, offsets: Tensor, rows: int, bm: int) -> tuple[Tensor, Tensor]:
    """(expert, first row) of every BM-row block; expert -1 past the last block. The table has a
    static length, ceil(rows / BM) + E, an upper bound, so building it never syncs the host."""
    e = counts.numel()
    per = (counts + bm - 1) // bm
    ends = torch.cumsum(per, 0)
    b = torch.arange(-(-rows // bm) + e, device=counts.device)
    owner = torch.searchsorted(ends, b, right=True).clamp_(max=e - 1)
    first = offsets[owner] + (b - (ends[owner] - per[owner])) * bm
    expert = torch.where(b < ends[-1], owner, -1).to(torch.int32)
    return expert, first
