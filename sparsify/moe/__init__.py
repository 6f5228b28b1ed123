"""The MoE layer: configuration, router, stacked experts, and the layer that joins them."""

from __future__ import annotations

from ..lazy_names import lazy_names

__all__ = ["MoEConfig", "ROUTER_KINDS", "Router", "Routing", "Experts", "SharedExpert", "SparseMoE", "aux_losses"]

# Imported on first use: a plan (`moe.config`) is read without torch, which the layers import.
__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["MoEConfig", "ROUTER_KINDS"], ".config"),
    **dict.fromkeys(["Experts", "SharedExpert"], ".experts"),
    **dict.fromkeys(["SparseMoE", "aux_losses"], ".layer"),
    **dict.fromkeys(["Router", "Routing"], ".router"),
}, __all__)
