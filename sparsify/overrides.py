"""Attribute overrides: values a plan sets on a model's modules when it applies an MoE.

An inline FFN's layer may apply a piece of the FFN itself (BART's `F.dropout(h,
p=self.activation_dropout)`, torch's `self.activation(...)`); once the MoE applies that piece,
the layer's attribute is set to a rate of 0 or to the identity. The plan records each override
as JSON, so that `sparsify.load` re-applies it from the plan alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IDENTITY", "identity", "override_value"]

IDENTITY = {"function": "identity"}  # how an override to the identity function is written in a plan


def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """The identity: what a layer's activation attribute becomes once the MoE applies it."""
    return x


def override_value(value: Any) -> Any:
    """The Python value a plan's override stands for."""
    return identity if value == IDENTITY else value
