"""Backend choice and the one entry point `moe_ffn` that `SparseMoE` calls.

A backend is a module with `permute`, `grouped_ffn`, `combine`, `moe_ffn` and
`supports(device, dtype, activation) -> reason | None`. `"auto"` picks, per device, the first
backend of `AUTO` that supports the layer; `reference` runs everywhere.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..errors import OptionError
from . import cpu, reference
from . import triton as triton_backend

__all__ = ["BACKENDS", "AUTO", "get_backend", "choose_backend", "check_backend", "moe_ffn"]

BACKENDS: dict[str, ModuleType] = {"reference": reference, "cpu": cpu, "triton": triton_backend}

# Preference per device type for "auto"; devices not listed get "reference".
AUTO: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("triton",)}


def get_backend(name: str) -> ModuleType:
    """The backend module called `name`."""
    try:
        return BACKENDS[name]
    except KeyError:
        choices = ", ".join(["auto", *BACKENDS])
        raise OptionError(f"unknown kernel backend {name!r}; choose one of {choices}") from None


def choose_backend(device: torch.device, dtype: torch.dtype, activation: str) -> str:
    """The fastest backend that supports a layer with this device, dtype and activation."""
    for name in AUTO.get(torch.device(device).type, ()):
        if BACKENDS[name].supports(torch.device(device), dtype, activation) is None:
            return name
    return "reference"


def check_backend(name: str, device: torch.device, dtype: torch.dtype, activation: str) -> str:
    """`name` resolved ("auto" -> a backend) and checked to run such a layer; OptionError if not."""
    if name == "auto":
        return choose_backend(device, dtype, activation)
    reason = get_backend(name).supports(torch.device(device), dtype, activation)
    if reason is not None:
        raise OptionError(f"kernel backend {name!r} cannot run this MoE layer: {reason}; use backend='auto'")
    return name


def moe_ffn(
    x: torch.Tensor,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    weight: torch.Tensor,
    experts: "torch.nn.Module",
    backend: str = "reference",
) -> torch.Tensor:
    """Route rows of `x` [T, H] to experts as the (token, expert, weight) pairs say; combine.

    `backend` is a name of `BACKENDS` or "auto" (chosen from `x`'s device).
    """
    name = check_backend(backend, x.device, experts.w1.dtype, experts.activation)
    return BACKENDS[name].moe_ffn(x, token_idx, expert_idx, weight, experts)
