"""Training an upcycled model: router losses in the returned loss, router statistics, and
checkpoints that stay sparsify outputs.

    model = sparsify.upcycle("demo:llama", experts=8)     # or sparsify.load(dir)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()      # includes the router losses
    sparsify.router_stats(model)                          # {"router/model.layers.1.mlp/entropy": ...}

    Trainer(model=model, args=args, train_dataset=ds, callbacks=[RouterStats()]).train()

Models from `sparsify.upcycle` and `sparsify.load` are prepared by `prepare_for_training`; call it
for an upcycled model made another way.
"""

from __future__ import annotations

import torch.nn as nn

from .aux_loss import include_aux_losses, includes_aux_losses
from .callback import RouterStats
from .checkpoint import prepare_checkpoints, save_native_pretrained
from .stats import RoutingTotals, router_stats, track_routers

__all__ = [
    "RouterStats",
    "router_stats",
    "RoutingTotals",
    "track_routers",
    "include_aux_losses",
    "includes_aux_losses",
    "prepare_for_training",
    "prepare_checkpoints",
    "save_native_pretrained",
]


def prepare_for_training(model: nn.Module, format_name: str | None = None) -> nn.Module:
    """What `sparsify.upcycle` and `sparsify.load` do to the model they return, for an upcycled
    model made another way (a `PassManager` run; a Mixtral, Qwen-MoE or Switch output loaded by
    transformers): `include_aux_losses`, `track_routers`, and, for a model with a
    `sparsify_plan`, `save_pretrained` writing a checkpoint `sparsify.load` reads
    (`prepare_checkpoints`; `format_name`: the output format it was loaded from, None for native).
    Returns `model`."""
    return prepare_checkpoints(track_routers(include_aux_losses(model)), format_name)

