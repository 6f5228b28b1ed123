"""`permute`: group the (token, expert) pairs by expert.

    order, counts = permute(expert_idx, num_experts, backend="cpu")

`expert_idx` [P] holds each pair's expert. `order` [P] is the stable permutation that sorts the
pairs by expert (pairs of one expert keep their order, so with top-k routing every token's first
choice precedes any second choice within an expert), `counts` [E] the pairs per expert; expert
e's pairs are `order[offsets[e]:offsets[e + 1]]` with `offsets = [0, *cumsum(counts)]`.
"""

from __future__ import annotations

import torch

from .dispatch import get_backend

__all__ = ["permute"]


def permute(
    expert_idx: torch.Tensor, num_experts: int, backend: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts) of the pairs grouped by expert, computed by `backend`."""
    name = "reference" if backend == "auto" else backend  # every backend sorts with torch
    return get_backend(name).permute(expert_idx, num_experts)
