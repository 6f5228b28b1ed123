"""Activation functions known to sparsify, and recognition of an activation from its values.

FFN discovery finds the activation as an arbitrary elementwise ATen subgraph (GPT-2's "new
gelu", for instance, is eight nodes of mul/pow/tanh/add). Rather than pattern-match every way a
model can spell an activation, discovery evaluates the subgraph on probe values and compares it
with the functions below: the name is what the function *does*, not how it is written.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "get_activation", "identify_activation"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu2": lambda x: torch.square(F.relu(x)),
    "mish": F.mish,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called `name` (one of `ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


def _probe_values() -> torch.Tensor:
    # Dense coverage of the range where activations differ, plus a few large magnitudes.
    grid = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    return torch.cat([grid, torch.tensor([-30.0, -12.5, 12.5, 30.0], dtype=torch.float64)])


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Name of the known activation that `fn` computes (to 1e-5), or None if it is none of them."""
    x = _probe_values()
    try:
        y = fn(x.clone())
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    y = y.to(torch.float64)
    for name, ref in ACTIVATIONS.items():
        r = ref(x)
        if torch.allclose(y, r, rtol=1e-5, atol=1e-6 * max(1.0, math.fabs(float(r.abs().max())))):
            return name
    return None
