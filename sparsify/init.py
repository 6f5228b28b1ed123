"""Deterministic initial values of new tensors: router weights and per-expert noise.

Each value comes from its own generator, seeded from (seed, site path, tensor role, expert), so
any executor (in memory, streaming, one rank of many) produces the same bytes in any order.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derived_generator", "router_weight", "expert_noise"]


def derived_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from `seed` and `parts` (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def router_weight(site_path: str, num_experts: int, hidden_size: int, std: float, seed: int) -> torch.Tensor:
    """Initial router weight [E, H] (float32): normal(0, std)."""
    g = derived_generator(seed, "router", site_path)
    return torch.randn(num_experts, hidden_size, generator=g, dtype=torch.float32) * std


def expert_noise(site_path: str, role: str, expert: int, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """Noise (float32, normal(0, std)) added to expert `expert`'s copy of weight `role`."""
    g = derived_generator(seed, "noise", site_path, role, expert)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32) * std
