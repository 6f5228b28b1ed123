"""Activation functions known to sparsify, and recognition of an activation from its values.

FFN discovery finds the activation as an arbitrary elementwise ATen subgraph (GPT-2's "new
gelu", for instance, is eight nodes of mul/pow/tanh/add). Rather than pattern-match every way a
model can spell an activation, discovery evaluates the subgraph on probe values and compares it
with the functions below: the name is what the function *does*, not how it is written.

Parametrised activations (`PARAMETRISED`: Apertus' xIELU, whose learned parameters differ per
layer) are known the same way: the subgraph is evaluated with random values for the model
tensors it reads and compared with each family's formula, for every assignment of those
tensors to the family's parameters. The MoE then carries the layer's own parameter values.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "PARAMETRISED", "get_activation", "identify_activation", "identify_parametrised"]


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


def _xielu(x: torch.Tensor, alpha_p: torch.Tensor, alpha_n: torch.Tensor, beta: torch.Tensor,
           eps: torch.Tensor) -> torch.Tensor:
    # xIELU (arXiv 2411.13010) in the parametrisation transformers' XIELUActivation stores:
    # raw alpha_p, alpha_n passed through softplus, in the parameters' own dtype.
    alpha_p = F.softplus(alpha_p)
    alpha_n = beta + F.softplus(alpha_n)
    return torch.where(x > 0, alpha_p * x * x + beta * x, (torch.expm1(torch.min(x, eps)) - x) * alpha_n + beta * x)


# name -> (function of (x, **parameters), parameter names)
PARAMETRISED: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "xielu": (_xielu, ("alpha_p", "alpha_n", "beta", "eps")),
}


def get_activation(name: str | Callable, params: dict[str, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called `name` (one of `ACTIVATIONS`, or of `PARAMETRISED` with
    its `params` bound); a callable is returned as it is."""
    if callable(name):
        return name
    if name in PARAMETRISED:
        fn, names = PARAMETRISED[name]
        if params is None or set(params) != set(names):
            raise ValueError(f"activation {name!r} needs its parameters {', '.join(names)}")
        return partial(fn, **params)
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join([*ACTIVATIONS, *PARAMETRISED])}") from None


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


def identify_parametrised(fn: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor],
                          shapes: Sequence[tuple[int, ...]], draws: int = 3) -> tuple[str, list[str]] | None:
    """The parametrised activation that `fn(x, tensors)` computes, and the parameter name of
    each of its tensors (of `shapes`), or None. Compared on probe values for `draws` random
    values of the tensors (to 1e-6), for every assignment of tensors to parameters."""
    x = _probe_values()
    g = torch.Generator().manual_seed(0)
    trials = [[torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in shapes] for _ in range(draws)]
    try:
        outputs = [fn(x.clone(), [t.clone() for t in values]) for values in trials]
    except Exception:
        return None
    if not all(isinstance(y, torch.Tensor) and y.shape == x.shape for y in outputs):
        return None
    for name, (ref, names) in PARAMETRISED.items():
        if len(names) != len(shapes):
            continue
        for order in itertools.permutations(names):
            if all(torch.allclose(y.to(torch.float64), ref(x, **dict(zip(order, values))), rtol=1e-6, atol=1e-9)
                   for y, values in zip(outputs, trials)):
                return name, list(order)
    return None
