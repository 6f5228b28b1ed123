"""Capture a model as an ATen graph with torch.export, using example inputs made from its config.

transformers 5 removed its torch.fx tracer, while `torch.export.export(..., strict=False)`
captures Hugging Face models whole and tags every node with `nn_module_stack`, the path of the
module that owns it. That tag is what FFN discovery maps matches back to modules with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import CaptureError

__all__ = ["Captured", "capture", "example_inputs_for"]

DEFAULT_BATCH, DEFAULT_SEQ = 2, 8


@dataclass
class Captured:
    """An exported program plus the inputs it was captured with."""

    program: torch.export.ExportedProgram
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        """The ATen graph that analysis passes read."""
        return self.program.graph_module.graph

    def param_name(self, node: torch.fx.Node) -> str | None:
        """The model parameter (or buffer) name a placeholder node stands for, if any."""
        sig = self.program.graph_signature
        return sig.inputs_to_parameters.get(node.name) or sig.inputs_to_buffers.get(node.name)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def example_inputs_for(
    model: nn.Module, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ, seed: int = 0
) -> dict[str, Any]:
    """Keyword inputs for a Hugging Face model made from its config: token ids of shape
    [batch, seq] (and decoder ids for encoder-decoder models), `use_cache=False`."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if not vocab:
        raise CaptureError(
            f"cannot make example inputs for {type(model).__name__}: it has no Hugging Face config "
            "with vocab_size; pass example_inputs=(x,)"
        )
    g = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    if hasattr(config, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def capture(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> Captured:
    """Export `model` in eval mode (dropout as identity) with the given or config-made inputs."""
    if example_inputs is None and example_kwargs is None:
        args, kwargs = (), example_inputs_for(model)
    else:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    # Discovery reads nn_module_stack, never stack traces; recording one per node is a large
    # share of export time on big models.
    import torch.fx.config as fx_config

    emit_traces = getattr(fx_config, "do_not_emit_stack_traces", None)
    if emit_traces is not None:
        fx_config.do_not_emit_stack_traces = True
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # torch.export raises many types; all mean "could not capture"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first[:300]}; "
            "check that example_inputs match the model's forward"
        ) from err
    finally:
        model.train(was_training)
        if emit_traces is not None:
            fx_config.do_not_emit_stack_traces = emit_traces
    return Captured(program, args, kwargs)
