"""The dropout mask of the hidden activations, drawn once per call by the fused backends.

The fused kernels cannot call `F.dropout` inside an expert loop they do not run in Python, so
the mask is drawn up front, from torch's generator like any dropout, one row per (sorted) pair:
`keep / (1 - p)` with keep ~ Bernoulli(1 - p), all zeros when p = 1.
"""

from __future__ import annotations

import torch

__all__ = ["hidden_dropout_mask"]


def hidden_dropout_mask(rows: int, inter: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """[rows, inter] scaled keep-mask in `like`'s dtype and device."""
    keep = torch.empty((rows, inter), dtype=like.dtype, device=like.device).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p) if p < 1.0 else keep
