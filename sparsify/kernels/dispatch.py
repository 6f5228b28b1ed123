"""Backend choice and the one entry point `moe_ffn` that `SparseMoE` calls."""

from __future__ import annotations

from types import ModuleType

import torch

from ..errors import OptionError
from . import reference

__all__ = ["BACKENDS", "get_backend", "moe_ffn"]

BACKENDS: dict[str, ModuleType] = {"reference": reference}


def get_backend(name: str) -> ModuleType:
    """The backend module called `name`."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise OptionError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


def moe_ffn(
    x: torch.Tensor,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    weight: torch.Tensor,
    experts: "torch.nn.Module",
    backend: str = "reference",
) -> torch.Tensor:
    """Route rows of `x` [T, H] to experts as the (token, expert, weight) pairs say; combine."""
    ops = get_backend(backend)
    order, counts = ops.permute(expert_idx, experts.num_experts)
    tok_sorted = token_idx[order]
    y = ops.grouped_ffn(
        x[tok_sorted],
        counts,
        experts.w1,
        experts.w2,
        experts.w3,
        experts.b1,
        experts.b2,
        experts.b3,
        activation=experts.activation,
        dropout=experts.dropout,
        training=experts.training,
    )
    return ops.combine(y, tok_sorted, weight[order], x.shape[0])
