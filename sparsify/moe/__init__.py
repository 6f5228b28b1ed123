"""The MoE layer: configuration, router, stacked experts, and the layer that joins them."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MoEConfig", "ROUTER_KINDS", "Router", "Routing", "Experts", "SharedExpert", "SparseMoE", "aux_losses"]

_WHERE = {
    **dict.fromkeys(["MoEConfig", "ROUTER_KINDS"], ".config"),
    **dict.fromkeys(["Experts", "SharedExpert"], ".experts"),
    **dict.fromkeys(["SparseMoE", "aux_losses"], ".layer"),
    **dict.fromkeys(["Router", "Routing"], ".router"),
}


def __getattr__(name: str) -> Any:
    # Imported on first use: a plan (`moe.config`) is read without torch, which the layers import.
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
