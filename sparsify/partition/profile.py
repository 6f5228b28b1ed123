"""Record routing statistics by running an MoE model over calibration batches.

A forward hook on each MoE layer's router sees the routing pairs it produces; nothing in the
model changes, so the statistics are those of the model exactly as it runs.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import PlanError
from ..moe import SparseMoE
from ..streaming.layers import StreamedMoE
from .stats import LayerStats, RoutingStats

__all__ = ["moe_layers", "profile_routing"]


def moe_layers(model: nn.Module) -> dict[str, SparseMoE | StreamedMoE]:
    """The MoE layers of `model` by module path (streamed ones too); `PlanError` when there is none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (SparseMoE, StreamedMoE))}
    if not layers:
        raise PlanError(f"{type(model).__name__} has no MoE layer; upcycle it first (sparsify upcycle)")
    return layers


@torch.no_grad()
def profile_routing(model: nn.Module, batches: Iterable[dict[str, Any]], calibration: dict[str, Any] | None = None) -> RoutingStats:
    """Run `model` (in eval mode) on each batch of keyword inputs and count, per MoE layer,
    the assignments per expert and the tokens that chose each pair of experts."""
    layers = moe_layers(model)
    first = next(iter(layers.values())).config
    stats = RoutingStats(first.num_experts, first.top_k, {p: LayerStats.empty(m.config.num_experts) for p, m in layers.items()})

    def hook(path: str):
        def record(router: nn.Module, args: tuple, routing: Any) -> None:
            stats.layers[path].add(routing.token_idx, routing.expert_idx, args[0].shape[0])

        return record

    handles = [m.router.register_forward_hook(hook(p)) for p, m in layers.items()]
    was_training = model.training
    model.eval()
    sequences = 0
    try:
        for batch in batches:
            model(**batch)
            sequences += int(batch["input_ids"].shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats.calibration = {**(calibration or {}), "sequences": sequences}
    return stats
