"""The router losses inside the loss a model returns when it trains.

A native sparsify model is its dense class with `SparseMoE` modules in place of some FFNs, so its
forward (the dense class's) knows nothing of routers: the balancing and z losses that each router
records (`sparsify.aux_losses`) are added to `output.loss` by a forward hook. The Hugging Face
MoE classes (Mixtral, Qwen-MoE, Switch) add their own router losses when asked for router logits,
so for them a pre-hook asks for them, in training only.

Only in training mode and only when the forward computed a loss (labels were given): evaluation,
generation and inference return what the class returns. The hook adds tensor operations only;
nothing waits for the device.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe import SparseMoE, aux_losses

__all__ = ["include_aux_losses", "includes_aux_losses", "HF_MOE_CLASSES"]

# transformers' MoE classes that add their router losses to the loss when called with
# `output_router_logits=True` (each with its own coefficients from its config).
HF_MOE_CLASSES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "SwitchTransformersForConditionalGeneration",
)

_HANDLES = "_sparsify_aux_hooks"


def include_aux_losses(model: nn.Module, include: bool = True) -> nn.Module:
    """Make `model` add its weighted router losses to the loss it returns in training mode (or,
    with `include=False`, stop). Idempotent; returns `model`.

    `sparsify.upcycle` and `sparsify.load` do this already; call it for an upcycled model built
    another way (a `PassManager` run, or an MoE in a Hugging Face format loaded by transformers).
    Native models get `sparsify.aux_losses(model)` added; Mixtral, Qwen-MoE and Switch models are
    called with `output_router_logits=True`, which makes them add their own router losses.
    """
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    handles = []
    if include:
        if type(model).__name__ in HF_MOE_CLASSES:
            handles.append(model.register_forward_pre_hook(_ask_for_router_losses, with_kwargs=True))
        elif any(isinstance(m, SparseMoE) for m in model.modules()):
            handles.append(model.register_forward_hook(_add_aux_losses, with_kwargs=True))
    # a plain attribute (nn.Module keeps non-tensor, non-module values in __dict__)
    object.__setattr__(model, _HANDLES, tuple(handles))
    return model


def includes_aux_losses(model: nn.Module) -> bool:
    """Whether `model`'s training loss includes its router losses (see `include_aux_losses`)."""
    return bool(getattr(model, _HANDLES, ()))


def _ask_for_router_losses(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if module.training and kwargs.get("output_router_logits") is None:
        return args, {**kwargs, "output_router_logits": True}
    return None


def _add_aux_losses(module: nn.Module, args: tuple, kwargs: dict, output):
    if not module.training:
        return None
    loss = output.get("loss") if isinstance(output, dict) else None
    if loss is None:
        # return_dict=False: the loss, when there is one, is the first element
        if isinstance(output, tuple) and kwargs.get("labels") is not None and isinstance(output[0], torch.Tensor):
            return (output[0] + _batch_share(module, kwargs) * aux_losses(module), *output[1:])
        return None
    output["loss"] = loss + _batch_share(module, kwargs) * aux_losses(module)
    return output


def _batch_share(model: nn.Module, kwargs: dict) -> torch.Tensor | float:
    """The share of the accumulated batch that this forward's loss stands for.

    With gradient accumulation, `transformers.Trainer` passes `num_items_in_batch` (the label
    count of all micro-batches together) and the model's loss becomes this micro-batch's label sum
    over that count; the Trainer then adds the micro-batches' losses without averaging them. The
    router losses are means over this micro-batch's tokens, so they are weighted by the same share
    of labels, counted as the Trainer counts them; otherwise they would weigh once per micro-batch.
    """
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if labels is not None and _loss_shifts_labels(model):
            labels = labels[..., 1:]
    if total is None or labels is None:
        return 1.0
    return labels.ne(-100).sum() / total


def _loss_shifts_labels(model: nn.Module) -> bool:
    # The Trainer's own rule (`Trainer._loss_shifts_labels`): causal-LM losses drop position 0.
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(config, "is_encoder_decoder", False))
