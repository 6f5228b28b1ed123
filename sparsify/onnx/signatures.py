"""Which graphs a model exports, with which inputs and outputs.

    decoder-only / encoder-only   MAIN [, attention_mask] -> logits | last_hidden_state | ...
    encoder-decoder               STEM-encoder: MAIN [, attention_mask] -> last_hidden_state
                                  STEM-decoder: decoder_input_ids, encoder_hidden_states
                                                [, encoder_attention_mask] -> logits

MAIN is the model's own input (`sparsify.inputs`): `input_ids` (with `attention_mask`, and
`bbox` for document models, `pixel_values` for ViLT, LXMERT's regions, `lang_ids` for X-MOD), `pixel_values`, `input_features`, `input_values`, `past_values` or a
Decision Transformer's `states` (with actions, returns-to-go, timesteps and mask) or a drafter's
`noise_embeds` (with the target model's `context_hidden_states`), so a
graph's inputs carry the names the model's forward gives them. Each graph is a small wrapper
module around the model (held as
attribute `WRAPPER`), traced with example inputs and, by default, dynamic axes: batch and
sequence for token inputs, batch for images and audio (their other sizes are the configured ones).

Vision towers of Qwen2-VL style take flattened patches and the grid they were cut from, whose
values size every tensor of the forward: their graph takes the patches only and holds the grid
of its example inputs (`GridGraph.fixed`), static; the export records that grid in the graph's
metadata, and a dynamic export is refused in one line saying so.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
import torch.nn as nn

from ..inputs import fixed_options, input_specs, main_input_param
from ..verify import main_output

__all__ = ["WRAPPER", "ModelGraph", "PixelGraph", "GridGraph", "PatchesGraph", "PixelPatchesGraph", "FeaturesGraph",
           "AudioGraph", "EncoderGraph", "DecoderGraph", "graph_inputs", "graph_paths", "model_graphs", "fixed_inputs",
           "name_io", "output_name"]

WRAPPER = "model"  # attribute under which the wrappers hold the model


class ModelGraph(nn.Module):
    """input_ids, attention_mask -> the model's first output (logits or last hidden state); with
    `encoder=True`, the encoder's last hidden state. Subclasses take the other kinds of input."""

    def __init__(self, model: nn.Module, encoder: bool = False) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                bbox: torch.Tensor | None = None, visual_feats: torch.Tensor | None = None,
                visual_pos: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                lang_ids: torch.Tensor | None = None) -> torch.Tensor:
        # no mask for models whose forward takes none (FNet, xLSTM): model_graphs then passes none;
        # bbox: the token boxes of document models (LayoutLM, LiLT, BROS); pixel_values: the image
        # of a vision-and-language model (ViLT); visual_*: LXMERT's regions; lang_ids: X-MOD's languages
        extra = {k: v for k, v in (("attention_mask", attention_mask), ("bbox", bbox), ("visual_feats", visual_feats),
                                   ("visual_pos", visual_pos), ("pixel_values", pixel_values), ("lang_ids", lang_ids))
                 if v is not None}
        return self._run(input_ids=input_ids, **extra)

    def _run(self, **inputs: torch.Tensor) -> torch.Tensor:
        model = getattr(self, WRAPPER)
        if self.encoder:
            return model.get_encoder()(**inputs).last_hidden_state
        extra = fixed_options(model)
        return main_output(model(**inputs, **extra))


class PixelGraph(ModelGraph):
    """pixel_values -> the model's first output (or the encoder's last hidden state)."""

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                prompt_pixel_values: torch.Tensor | None = None, prompt_masks: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None, spatial_shapes: torch.Tensor | None = None,
                pixel_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # noise: ViT-MAE's masking noise, an input of the graph so that it computes the same mask;
        # prompt_*: SegGPT's prompt image and mask; the patch grid of SigLIP 2's patch sequences;
        # the patches' coordinates (Gemma 4)
        extra = {k: v for k, v in (("noise", noise), ("prompt_pixel_values", prompt_pixel_values),
                                   ("prompt_masks", prompt_masks), ("pixel_attention_mask", pixel_attention_mask),
                                   ("spatial_shapes", spatial_shapes), ("pixel_position_ids", pixel_position_ids))
                 if v is not None}
        return self._run(pixel_values=pixel_values, **extra)


class VideoGraph(ModelGraph):
    """pixel_values_videos -> the first output (V-JEPA 2, VideoPrism)."""

    def forward(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        return self._run(pixel_values_videos=pixel_values_videos)


class FeaturesGraph(ModelGraph):
    """input_features (mel or filter-bank features), with their frame mask where the model takes
    one -> the first output (or the encoder's)."""

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = {} if input_features_mask is None else {"input_features_mask": input_features_mask}
        return self._run(input_features=input_features, **mask)


class AudioGraph(ModelGraph):
    """input_values (raw audio or a spectrogram) -> the first output (or the encoder's)."""

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self._run(input_values=input_values)


class LatentsGraph(ModelGraph):
    """latents (an audio decoder's: Mimi's) -> the first output."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(latents=latents)


class HiddenStatesGraph(ModelGraph):
    """hidden_states, where forward names its main input so (VibeVoice's tokenizer halves) -> the
    first output."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._run(hidden_states=hidden_states)


class EmbedsGraph(ModelGraph):
    """inputs_embeds (another model's states, where they are the main input) -> the first output."""

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self._run(inputs_embeds=inputs_embeds)


class SeriesGraph(ModelGraph):
    """past_values (a time series), with its time features and observed mask, or its padding
    and frequency (TimesFM), where the model takes them -> the first output."""

    def forward(self, past_values: torch.Tensor, past_time_features: torch.Tensor | None = None,
                past_observed_mask: torch.Tensor | None = None, past_values_padding: torch.Tensor | None = None,
                freq: torch.Tensor | None = None) -> torch.Tensor:
        extra = {k: v for k, v in (("past_time_features", past_time_features),
                                   ("past_observed_mask", past_observed_mask),
                                   ("past_values_padding", past_values_padding), ("freq", freq)) if v is not None}
        return self._run(past_values=past_values, **extra)


class GridGraph(ModelGraph):
    """Flattened patches -> the first output, at the fixed image grid (and merge sizes) `fixed`
    ({input name: values}), which the graph holds as constants instead of taking as inputs."""

    def __init__(self, model: nn.Module, fixed: dict[str, list]) -> None:
        super().__init__(model)
        self.fixed = fixed

    def _patches(self, name: str, patches: torch.Tensor) -> torch.Tensor:
        # made here, from Python numbers: torch.export keeps them constants (sparsify.capture)
        fixed = {k: torch.tensor(v, dtype=torch.long, device=patches.device) for k, v in self.fixed.items()}
        return self._run(**{name: patches}, **fixed)


class PatchesGraph(GridGraph):
    """hidden_states (flattened patches; Qwen2.5-VL, GLM-4V) -> the first output."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._patches("hidden_states", hidden_states)


class PixelPatchesGraph(GridGraph):
    """pixel_values (flattened patches; GLM-Image, VideoLLaMA 3) -> the first output."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._patches("pixel_values", pixel_values)


class TrajectoryGraph(ModelGraph):
    """states, actions, returns_to_go, timesteps, attention_mask -> the first output (a Decision
    Transformer's state predictions)."""

    def forward(self, states: torch.Tensor, actions: torch.Tensor | None = None,
                returns_to_go: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = {k: v for k, v in (("actions", actions), ("returns_to_go", returns_to_go), ("timesteps", timesteps),
                                   ("attention_mask", attention_mask)) if v is not None}
        return self._run(states=states, **extra)


class QueryGraph(ModelGraph):
    """query_embeds, encoder_hidden_states -> the first output (BLIP-2's Q-Former)."""

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        return self._run(query_embeds=query_embeds, **extra)


class DraftGraph(ModelGraph):
    """noise_embeds, context_hidden_states, attention_mask -> the first output (a DFlash drafter's
    block)."""

    def forward(self, noise_embeds: torch.Tensor, context_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = {k: v for k, v in (("context_hidden_states", context_hidden_states),
                                   ("attention_mask", attention_mask)) if v is not None}
        return self._run(noise_embeds=noise_embeds, **extra)


class EncoderGraph(ModelGraph):
    """input_ids, attention_mask -> the encoder's last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, encoder=True)


class DecoderGraph(nn.Module):
    """decoder_input_ids, encoder_hidden_states[, encoder_attention_mask] -> logits (the mask
    only for encoders that read token ids)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPER, model)

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        encoded = _encoder_output(encoder_hidden_states)
        mask = {} if encoder_attention_mask is None else {"attention_mask": encoder_attention_mask}
        out = getattr(self, WRAPPER)(encoder_outputs=encoded, decoder_input_ids=decoder_input_ids, use_cache=False,
                                     **mask)
        return out.logits


_ENCODER_OUTPUT = []


def _encoder_output(hidden: torch.Tensor):
    """The encoder's output as the decoder graph is given it: its last hidden state, with an
    `attention_mask` of None. Encoders that change the sequence length return their positions'
    mask with their output, and their model's forward reads it from there (Moonshine:
    `encoder_outputs.attention_mask`); it is None when the encoder is given no mask, as audio
    encoders' graphs are. Token encoders' masks reach the decoder as `attention_mask`, as the
    model's forward takes them (None fields are not in the output's tuple, so indexing it is as
    for a BaseModelOutput)."""
    if not _ENCODER_OUTPUT:  # a ModelOutput class registers itself with torch's pytree once
        from dataclasses import dataclass

        from transformers.modeling_outputs import BaseModelOutput

        @dataclass
        class EncoderOutput(BaseModelOutput):
            attention_mask: torch.Tensor | None = None

        _ENCODER_OUTPUT.append(EncoderOutput)
    return _ENCODER_OUTPUT[0](last_hidden_state=hidden)


_GRAPHS = {"input_ids": ModelGraph, "pixel_values": PixelGraph, "input_features": FeaturesGraph,
           "input_values": AudioGraph, "past_values": SeriesGraph, "pixel_values_videos": VideoGraph,
           "inputs_embeds": EmbedsGraph, "latents": LatentsGraph, "hidden_states": HiddenStatesGraph,
           "states": TrajectoryGraph, "query_embeds": QueryGraph, "noise_embeds": DraftGraph}


@torch.no_grad()
def output_name(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> str:
    """What the model returns first ("logits", "last_hidden_state", ...), from one forward of
    `inputs`, else of batch-1 inputs (torch.export does not let the traced forward record it).
    The export passes its example inputs: some models (Funnel) run only at their shapes."""
    from ..inputs import example_inputs_for

    inputs = inputs if inputs is not None else example_inputs_for(model, batch=1, seq=2)
    out = model(**{**inputs, **fixed_options(model)})
    if isinstance(out, dict):  # the key of what main_output returns
        found = main_output(out)
        return next((k for k, v in out.items() if _holds(v, found)), "output")
    return "output"


def _holds(value: Any, tensor: torch.Tensor) -> bool:
    if isinstance(value, torch.Tensor):
        return value is tensor
    return isinstance(value, (tuple, list)) and any(_holds(v, tensor) for v in value)


def _two_graphs(model_or_config: Any) -> bool:
    """Whether the model exports as an encoder and a decoder graph: an encoder-decoder model
    whose decoder reads token ids (time-series transformers make their decoder's inputs
    themselves and export as one graph)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not getattr(config, "is_encoder_decoder", False):
        return False
    forward = getattr(model_or_config, "forward", None)
    return forward is None or "decoder_input_ids" in inspect.signature(forward).parameters


def graph_paths(model_or_config: Any, out: str | Path) -> dict[str, Path]:
    """The files `export_onnx` writes for this model: {role: path}."""
    out = Path(out)
    if _two_graphs(model_or_config):
        return {r: out.with_name(f"{out.stem}-{r}{out.suffix or '.onnx'}") for r in ("encoder", "decoder")}
    return {"model": out}


def _dims(spec, dynamic: bool) -> dict[int, Any] | None:
    return {axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic} if dynamic else None


def model_graphs(model: nn.Module, batch: int, seq: int, dynamic: bool) -> list[tuple[str, nn.Module, dict, dict, str]]:
    """(role, wrapper, example kwargs, dynamic shapes, output name) for each graph of `model`."""
    from ..inputs import example_inputs_for

    main = main_input_param(model)
    specs = {s.name: s for s in input_specs(model, batch, seq)}
    if any(s.static_values for s in specs.values()):
        inputs = {k: v for k, v in example_inputs_for(model, batch, seq).items() if k in specs}
        fixed = {k: inputs[k].tolist() for k, s in specs.items() if s.static_values}
        return [_grid_graph(model, main, inputs, fixed, dynamic)]
    wrapper = _GRAPHS[main]
    graphs = graph_inputs(model, batch, seq, dynamic)
    if len(graphs) == 1:
        _, own, shapes = graphs[0]
        return [("model", wrapper(model), own, shapes, output_name(model, own))]
    (_, own, shapes), (_, decoder, decoder_shapes) = graphs
    return [
        ("encoder", wrapper(model, encoder=True), own, shapes, "last_hidden_state"),
        ("decoder", DecoderGraph(model), decoder, decoder_shapes, "logits"),
    ]


def graph_inputs(model: nn.Module, batch: int, seq: int, dynamic: bool) -> list[tuple[str, dict, dict]]:
    """(role, example kwargs, dynamic shapes) for each graph of `model`, at `batch` and `seq`."""
    from ..inputs import example_inputs_for

    config = model.config
    main = main_input_param(model)
    specs = {s.name: s for s in input_specs(model, batch, seq)}
    inputs = {k: v for k, v in example_inputs_for(model, batch, seq).items() if k in specs}
    own = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    shapes = {k: _dims(specs[k], dynamic) for k in own}
    if not _two_graphs(model):
        return [("model", own, shapes)]
    g = torch.Generator().manual_seed(0)
    width = getattr(config, "d_model", None) or getattr(config, "hidden_size", 0)
    hidden = torch.randn(batch, seq, width, generator=g).to(inputs[main].dtype if main != "input_ids" else torch.float32)
    # a dynamic export traces unequal decoder and encoder lengths so that they stay distinct
    dec_spec = specs["decoder_input_ids"]
    dec = torch.randint(0, dec_spec.high, (batch, max(2, seq - 1) if dynamic else seq), generator=g)
    d = torch.export.Dim.DYNAMIC
    tokens = {0: d, 1: d} if dynamic else None
    decoder = dict(decoder_input_ids=dec, encoder_hidden_states=hidden)
    decoder_shapes = dict(decoder_input_ids=tokens, encoder_hidden_states=tokens)
    if "attention_mask" in own:
        decoder["encoder_attention_mask"] = own["attention_mask"]
        decoder_shapes["encoder_attention_mask"] = tokens
    return [("encoder", own, shapes), ("decoder", decoder, decoder_shapes)]


def _grid_graph(model: nn.Module, main: str, inputs: dict, fixed: dict[str, list], dynamic: bool):
    """The one graph of a vision tower fed flattened patches, at the grid of `inputs`."""
    from ..errors import CaptureError

    if dynamic:
        raise CaptureError(
            f"could not export {type(model).__name__} to ONNX with dynamic shapes: its forward is sized by the values "
            f"of {', '.join(fixed)} (the image grid), which a graph cannot take as an input; export with static shapes "
            "(--static, or dynamic=False): the graph then holds the grid of --batch images, recorded in its metadata")
    wrapper = (PatchesGraph if main == "hidden_states" else PixelPatchesGraph)(model, fixed)
    return ("model", wrapper, {main: inputs[main]}, {main: None}, output_name(model, inputs))


def fixed_inputs(module: nn.Module) -> dict[str, list]:
    """The inputs an export wrapper holds fixed instead of taking them ({} for most)."""
    return dict(getattr(module, "fixed", None) or {})


def name_io(model: ir.Model, outputs: list[str]) -> None:
    """Name the graph outputs, and the symbolic dims batch / sequence (not torch's s43). Each
    length torch keeps apart gets a name of its own (ONNX Runtime takes dims of one name to be
    equal): one that another input's already named is called after its input (a drafter's mask
    over context and block: attention_mask_sequence); the batch is one, whatever torch kept apart."""
    for value, name in zip(model.graph.outputs, outputs):
        value.name = name
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in names:
                prefix = "encoder_" if value.name.startswith("encoder") else ""
                name = prefix + ("batch" if axis == 0 else "sequence")
                taken = axis and name in names.values()
                names[dim.value] = f"{value.name}_{name.removeprefix(prefix)}" if taken else name
    for value in [*model.graph.inputs, *model.graph.outputs, *(o for n in model.graph for o in n.outputs)]:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in names for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names
                                    else d for d in value.shape])
