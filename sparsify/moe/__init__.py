"""The MoE layer: configuration, router, stacked experts, and the layer that joins them."""

from .config import ROUTER_KINDS, MoEConfig
from .experts import Experts, SharedExpert
from .layer import SparseMoE, aux_losses
from .router import Router, Routing

__all__ = ["MoEConfig", "ROUTER_KINDS", "Router", "Routing", "Experts", "SharedExpert", "SparseMoE", "aux_losses"]
