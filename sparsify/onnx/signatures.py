"""Which graphs a model exports, with which inputs and outputs.

    decoder-only / encoder-only   input_ids, attention_mask -> logits | last_hidden_state
    encoder-decoder               STEM-encoder: input_ids, attention_mask -> last_hidden_state
                                  STEM-decoder: decoder_input_ids, encoder_hidden_states,
                                                encoder_attention_mask -> logits

Each graph is a small wrapper module around the model (held as attribute `WRAPPER`), traced
with example inputs and, by default, dynamic batch and sequence axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
import torch.nn as nn

from ..verify import main_output

__all__ = ["WRAPPER", "ModelGraph", "EncoderGraph", "DecoderGraph", "graph_paths", "model_graphs", "name_io"]

WRAPPER = "model"  # attribute under which the wrappers hold the model


class ModelGraph(nn.Module):
    """input_ids, attention_mask -> the model's first output (logits or last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return main_output(self._run(input_ids, attention_mask))

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        model = getattr(self, WRAPPER)
        extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra)

    @torch.no_grad()
    def output_name(self, inputs: dict[str, torch.Tensor] | None = None) -> str:
        """"logits" or "last_hidden_state": what the model returns first (one forward of
        `inputs`, else of 2 tokens; torch.export does not let the traced forward record it).
        The export passes its example inputs: some models (Funnel) run only at their shapes."""
        model = getattr(self, WRAPPER)
        if inputs is None:
            ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = self._run(inputs["input_ids"], inputs["attention_mask"])
        return "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> the encoder's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = getattr(self, WRAPPER).get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderGraph(nn.Module):
    """decoder_input_ids, encoder_hidden_states, encoder_attention_mask -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        out = getattr(self, WRAPPER)(encoder_outputs=encoded, attention_mask=encoder_attention_mask,
                                     decoder_input_ids=decoder_input_ids, use_cache=False)
        return out.logits


def graph_paths(model_or_config: Any, out: str | Path) -> dict[str, Path]:
    """The files `export_onnx` writes for this model: {role: path}."""
    out = Path(out)
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        return {r: out.with_name(f"{out.stem}-{r}{out.suffix or '.onnx'}") for r in ("encoder", "decoder")}
    return {"model": out}


def model_graphs(model: nn.Module, batch: int, seq: int, dynamic: bool) -> list[tuple[str, nn.Module, dict, dict]]:
    """(role, wrapper, example kwargs, dynamic shapes) for each graph of `model`."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    d = torch.export.Dim.DYNAMIC
    tokens = {0: d, 1: d} if dynamic else None
    if not getattr(config, "is_encoder_decoder", False):
        return [("model", ModelGraph(model), dict(input_ids=ids, attention_mask=mask),
                 dict(input_ids=tokens, attention_mask=tokens))]
    hidden = torch.randn(batch, seq, getattr(config, "d_model", getattr(config, "hidden_size", 0)), generator=g)
    # a dynamic export traces unequal decoder and encoder lengths so that they stay distinct
    dec = torch.randint(0, config.vocab_size, (batch, max(2, seq - 1) if dynamic else seq), generator=g)
    states = {0: d, 1: d} if dynamic else None
    return [
        ("encoder", EncoderGraph(model), dict(input_ids=ids, attention_mask=mask),
         dict(input_ids=tokens, attention_mask=tokens)),
        ("decoder", DecoderGraph(model),
         dict(decoder_input_ids=dec, encoder_hidden_states=hidden, encoder_attention_mask=mask),
         dict(decoder_input_ids=tokens, encoder_hidden_states=states, encoder_attention_mask=tokens)),
    ]


def name_io(model: ir.Model, outputs: list[str]) -> None:
    """Name the graph outputs, and the symbolic dims batch / sequence (not torch's s43)."""
    for value, name in zip(model.graph.outputs, outputs):
        value.name = name
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in names:
                prefix = "encoder_" if value.name.startswith("encoder") else ""
                names[dim.value] = prefix + ("batch" if axis == 0 else "sequence")
    for value in [*model.graph.inputs, *model.graph.outputs, *(o for n in model.graph for o in n.outputs)]:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in names for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names
                                    else d for d in value.shape])
