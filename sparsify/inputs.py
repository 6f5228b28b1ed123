"""Example inputs for a model, made from its forward signature and its config.

A Hugging Face model names its main input (`main_input_name`) and its config holds the sizes
that input must have. One rule per kind of input, keyed by the input's name:

    input_ids        token ids [batch, seq] below the vocabulary size (the config's, else that of
                     a tokenizer that needs no files: CANINE's Unicode code points); with attention_mask
                     (ones) when forward takes one, and decoder ids for encoder-decoder models;
                     bbox [batch, seq, 4] for document models that take one (LayoutLM, LiLT,
                     BROS, UDOP): a box per token, x0 <= x1 and y0 <= y1, integers below
                     max_2d_position_embeddings (and 1001) where configured, else in [0, 1);
                     pixel_values beside them where forward takes them and the config sizes
                     the image (ViLT); visual_feats [batch, seq, visual_feat_dim] and their
                     boxes visual_pos (LXMERT's regions); lang_ids (X-MOD) in the configured
                     default language
    pixel_values     [batch, num_channels, image_size, image_size] (224 when none is configured);
                     [batch, num_frames, num_channels, image_size, image_size] for video (also as
                     pixel_values_videos: V-JEPA 2's crop_size and frames_per_clip);
                     [batch, 2, num_channels, image_size, image_size] for the image pairs of
                     keypoint matchers (the families of transformers' keypoint-matching class);
                     [batch, num_patches, channels x patch x patch] already cut into patches,
                     with spatial_shapes and pixel_attention_mask, where forward takes them
                     (SigLIP 2's NaFlex: a square grid), or with each patch's (x, y) in
                     pixel_position_ids [batch, num_patches, 2] (Gemma 4: a square grid of twice
                     pooling_kernel_size patches a side)
    inputs_embeds    where it is the declared main input (a head fed another model's states):
                     [batch, seq, hidden_size]
    prompt_*         beside pixel values, where forward takes them (SegGPT's prompt image and
                     mask), of the same shape: each half the height of the configured canvas
    noise            beside pixel values, where forward takes it (ViT-MAE's random masking):
                     seeded [batch, patches], so that the forward is a function of its inputs
    input_features   mel features: [batch, num_mel_bins, frames] when the config has num_mel_bins
                     and a 1-d convolution reads them as channels (Whisper: exactly the frames its
                     encoder's convolutions reduce to max_source_positions), or when it has
                     n_window (Qwen3-ASR: whole chunks of 2 x n_window frames); [batch, frames,
                     num_mel_bins] when none does (Parakeet, LASR), as wide as the config's
                     input_size (Fun-ASR's stacked frames) or else as the first Linear the forward
                     reaches is sized for (a probe: Granite Speech 5's 4 x the bins); else [batch,
                     frames, feature size] (Speech2Text, SeamlessM4T, wav2vec2-BERT), where no
                     config field gives that size, the probe's (Gemma 4's audio tower)
    input_features_mask  beside features, where forward takes it: [batch, frames], all valid
    input_values     a spectrogram [batch, max_length, num_mel_bins] when the config has both
                     (audio spectrogram transformer), else raw audio [batch, samples], as many
                     samples as the convolutional feature encoder turns into `seq` frames (seq
                     times samples_per_token where the config says how many one token reads)
                     ([batch, channels, samples] where forward hands them to its first
                     convolution as they are, which a probe of the forward finds: codecs; latents
                     [batch, channels, seq] where that convolution reads more channels than the
                     configured audio has)
    latents          an audio decoder's: [batch, channels its first convolution reads, seq]
    (a declared main input that forward names otherwise is fed under forward's name for it)
    past_values      a time series: [batch, context_length + the largest lag] (by input_size
                     when it is above 1), with past_time_features [.., num_time_features] and an
                     all-ones past_observed_mask (Time Series Transformer, Informer, Autoformer),
                     or, where forward requires them, a past_values_padding of zeros and
                     frequency class 0 (TimesFM);
                     [batch, context_length, num_input_channels] for patch models (PatchTST,
                     PatchTSMixer)
    grid_thw         vision towers of Qwen2-VL style (Qwen2.5/3-VL, GLM-4V, ...), whose forward takes
                     flattened patches (hidden_states or pixel_values) and the grid they were cut
                     from: `batch` images of [1, 2m, 2m] patches (m the spatial_merge_size), the
                     patches [batch * 4m^2, channels * temporal_patch_size * patch_size^2], and
                     merge_sizes [batch] (m) where forward takes it (VideoLLaMA 3). A tower whose
                     forward cannot read flat rows gets them shaped as its patch embedding
                     consumes them: [.., channels, patch, patch] for a convolution it hands them
                     to (Kimi K2.5), one merged token's patches as an image [.., m*patch, m*patch,
                     channels] for a Linear over one patch (Inkling 2, its grid in tokens). The grid's
                     values fix every shape of the forward (which reads them with .tolist()):
                     its specs are `static_values`, which capture and export specialise to
                     their values (sparsify.capture)
    target_sizes     NaViT-style towers (MiniCPM-V, MiniCPM-OCR), whose forward takes images'
                     patches packed side by side in one row and each image's (rows, columns) of
                     patches: `batch` images of 2w x 2w patches (w the merger's window), packed
                     [1, channels, patch, batch * 4w^2 * patch] as their image processor packs
                     them, and target_sizes [batch, 2]: static values too, as grid_thw's
    query_embeds     BLIP-2's Q-Former: queries [batch, seq, hidden_size] and the image encoder's
                     encoder_hidden_states [batch, seq, encoder_hidden_size] they attend to
    noise_embeds     a block-diffusion drafter's (DFlash: Muse Glimmer's assistant): one block of
                     block_size token embeddings [batch, block_size, hidden_size] and the target
                     model's context_hidden_states [batch, seq, hidden_size x len(target_layer_ids)],
                     with a mask of ones over both [batch, seq + block_size]
    states           a Decision Transformer's episode: states [batch, seq, state_dim], actions
                     [.., act_dim], returns_to_go [.., 1], timesteps below max_ep_len, a mask

`input_specs` gives the shapes (and which axes may vary, for exports with dynamic shapes);
`example_inputs_for` gives seeded tensors. A model that fits none of the rules, or whose
forward requires more than these (image grids, bounding boxes, past values), raises
`CaptureError` naming what is missing, so the user can pass `example_inputs=(x,)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import CaptureError

__all__ = ["InputSpec", "input_specs", "STATIC_VALUE_INPUTS", "example_inputs_for", "main_input_name",
           "main_input_param", "model_device", "fixed_options", "DEFAULT_BATCH", "DEFAULT_SEQ"]

DEFAULT_BATCH, DEFAULT_SEQ = 2, 8
_DEFAULT_IMAGE = 224
_DEFAULT_SAMPLES = 16000  # one second of 16 kHz audio, when nothing says how the model reads it


@dataclass(frozen=True)
class InputSpec:
    """One input tensor: its forward argument name, shape, dtype, and for token ids the bound.

    `dynamic` lists the axes that may change between calls (batch; the sequence of tokens, of
    raw audio and of feature frames where the model takes any length); an export with dynamic
    shapes marks those."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    high: int = 0  # token ids are drawn from [0, high); 0: a float input drawn from N(0, 1)
    dynamic: tuple[int, ...] = (0,)
    # a constant, broadcast to the shape (a mask of ones; nested: patches' coordinates), not drawn
    fill: tuple = ()
    # values the forward reads as Python numbers to size its tensors (an image grid): a capture or
    # an export is specialised to them, and an exported graph holds them instead of taking them
    static_values: bool = False

    def make(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """A seeded tensor of this spec on `device`."""
        if self.fill:
            t = torch.tensor(self.fill, dtype=self.dtype).expand(self.shape).clone()
        elif self.name.endswith("attention_mask"):
            t = torch.ones(self.shape, dtype=self.dtype)
        elif self.name.endswith("bbox") or self.name == "visual_pos" and self.shape[-1] == 4:
            t = _boxes(self, generator)
        elif self.high:
            t = torch.randint(0, self.high, self.shape, generator=generator, dtype=self.dtype)
        else:
            t = torch.randn(self.shape, generator=generator).to(self.dtype)
        return t.to(device)


def _boxes(spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1: integers below `spec.high`, or
    fractions of the page where `high` is 0."""
    shape = (*spec.shape[:-1], 2, 2)  # two corners of (x, y)
    if spec.high:
        corners = torch.randint(0, spec.high, shape, generator=generator)
    else:
        corners = torch.rand(shape, generator=generator)
    return corners.sort(dim=-2).values.reshape(spec.shape).to(spec.dtype)


def model_device(model: nn.Module) -> torch.device:
    """Where inputs for `model` go: its parameters' device, the CPU for a model on the meta
    device (capture fakes the weights; the inputs stay real, see sparsify.capture)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _forward_params(model: nn.Module) -> tuple[set[str], bool]:
    """The names forward takes, and whether it also takes **kwargs of any name (untyped, or typed
    by a TypedDict that declares use_cache; transformers' `Unpack[TransformersKwargs]` does not)."""
    params = inspect.signature(model.forward).parameters.values()
    untyped = False
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            typed = getattr(p.annotation, "__args__", (p.annotation,))[0]  # Unpack[X] -> X
            keys = getattr(typed, "__annotations__", None) if hasattr(typed, "__total__") else None
            untyped = untyped or not isinstance(keys, dict) or "use_cache" in keys
    return {p.name for p in params}, untyped


GRID_INPUTS = ("grid_thw", "image_grid_thw")  # the names vision towers give the grid of their patches
SIZES_INPUT = "target_sizes"  # NaViT-style towers' (rows, columns) of patches per image (MiniCPM-V)
STATIC_VALUE_INPUTS = (*GRID_INPUTS, "merge_sizes", SIZES_INPUT)  # inputs made with static_values=True


def _grid_input(names: set[str]) -> str | None:
    return next((n for n in GRID_INPUTS if n in names), None)


_KINDS = ("input_ids", "pixel_values", "pixel_values_videos", "input_features", "input_values", "past_values",
          "states", "query_embeds")


def main_input_name(model: nn.Module) -> str | None:
    """The kind of input a model is fed: its flattened patches when forward takes an image grid
    and no token ids (a vision tower; the whole vision-language model is fed token ids), else its
    `main_input_name` when forward takes it (unless it is of no known kind and forward also takes
    a known one: Perceiver's generic `inputs` beside its `input_ids`), else the first of the known
    kinds that forward takes, else the declared kind where forward takes it under another name
    (see `main_input_param`)."""
    names, _ = _forward_params(model)
    if _grid_input(names) and "input_ids" not in names:
        return next((n for n in ("hidden_states", "pixel_values") if n in names), None)
    declared = getattr(model, "main_input_name", None)
    if declared in names and declared in _KINDS:
        return declared
    found = next((n for n in _KINDS if n in names), None)
    if declared in names and found is None:
        return declared
    if found is None and declared in (*_KINDS, "latents") and _first_required(model):
        return declared
    return found


def main_input_param(model: nn.Module) -> str | None:
    """The forward argument the main input goes to: its kind's name, or for a forward that names
    its declared main input otherwise, its first argument (VibeVoice's tokenizer halves declare
    input_values and take `hidden_states`)."""
    kind = main_input_name(model)
    names, _ = _forward_params(model)
    return kind if kind in names or kind is None else _first_required(model)


def _first_required(model: nn.Module) -> str | None:
    """The forward's first argument, where it has no default."""
    params = [*inspect.signature(model.forward).parameters.values()]
    if params and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and params[0].default is inspect.Parameter.empty:
        return params[0].name
    return None


def _vocab(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _tokenizer_vocab(config) -> int | None:
    """The id space of the family's tokenizer where the config names none and the tokenizer needs
    no vocabulary file to say it (CANINE reads Unicode code points)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    name = TOKENIZER_MAPPING_NAMES.get(getattr(config, "model_type", None) or "")
    name = name[0] if isinstance(name, (list, tuple)) else name
    try:
        vocab = tokenizer_class_from_name(name)().vocab_size if name else None
    except Exception:  # a tokenizer that needs its files (or is not installed): nothing to learn here
        return None
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def _conv_stride(module: nn.Module | None) -> int:
    """How many input frames one output position of `module`'s 1-d convolutions covers."""
    if module is None:
        return 1
    return math.prod(m.stride[0] for m in module.modules() if isinstance(m, nn.Conv1d))


def _encoder(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_encoder", None)
    try:
        return get() if callable(get) else None
    except Exception:  # models whose get_encoder needs arguments or has none to give
        return None


def _image(config, batch: int, dtype: torch.dtype, name: str = "pixel_values") -> InputSpec:
    size = getattr(config, "image_size", None) or getattr(config, "crop_size", None) or _DEFAULT_IMAGE
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(config, "num_channels", None) or 3
    frames = getattr(config, "num_frames", None) or getattr(config, "frames_per_clip", None)
    if name == "pixel_values_videos" and not (isinstance(frames, int) and frames > 0):
        tubelet = getattr(config, "tubelet_size", None)  # a video tower that sizes no clip: two tubelets
        frames = 2 * tubelet if isinstance(tubelet, int) and tubelet > 0 else 2
    if isinstance(frames, int) and frames > 0:  # a video: VideoMAE, TimeSformer, ViViT, V-JEPA 2
        return InputSpec(name, (batch, frames, channels, h, w), dtype)
    if _keypoint_matcher(config):  # two images to match keypoints between, side by side
        return InputSpec(name, (batch, 2, channels, h, w), dtype)
    return InputSpec(name, (batch, channels, h, w), dtype)


def _keypoint_matcher(config) -> bool:
    """The config is of a family that transformers' keypoint-matching auto class serves
    (EfficientLoFTR, SuperGlue, LightGlue): its models read image pairs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_KEYPOINT_MATCHING_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_KEYPOINT_MATCHING_MAPPING_NAMES


def _bbox(config, batch: int, seq: int, dtype: torch.dtype) -> InputSpec:
    """A box per token for document models: integer corners below max_2d_position_embeddings
    (LayoutLM's page normalised to 0-1000) where the config sets it, else fractions (BROS)."""
    positions = getattr(config, "max_2d_position_embeddings", None)
    if isinstance(positions, int) and positions > 1:
        return InputSpec("bbox", (batch, seq, 4), torch.long, high=min(positions, 1001), dynamic=(0, 1))
    return InputSpec("bbox", (batch, seq, 4), dtype, dynamic=(0, 1))


def _patch_sequence(config, batch: int, dtype: torch.dtype, names: set[str]) -> list[InputSpec]:
    """SigLIP 2's NaFlex input: images already cut into a square grid of num_patches flattened
    patches [batch, num_patches, channels x patch x patch], their (rows, columns) and a mask of ones."""
    patches, patch = getattr(config, "num_patches", None), getattr(config, "patch_size", None)
    side = math.isqrt(patches) if isinstance(patches, int) and patches > 0 else 0
    if not side or not isinstance(patch, int):
        raise CaptureError("cannot make pixel_values for a model that reads spatial_shapes: its config names no "
                           "num_patches and patch_size; pass example_inputs=(x,)")
    channels = getattr(config, "num_channels", None) or 3
    specs = [InputSpec("pixel_values", (batch, side * side, channels * patch * patch), dtype)]
    if "pixel_attention_mask" in names:
        specs.append(InputSpec("pixel_attention_mask", (batch, side * side), torch.long, fill=(1,)))
    specs.append(InputSpec("spatial_shapes", (batch, 2), torch.long, fill=(side, side)))
    return specs


def _positioned_patches(model: nn.Module, config, batch: int, dtype: torch.dtype) -> list[InputSpec]:
    """Gemma 4's vision input: each image a square grid of side x side patches, flattened as its
    image processor cuts them [batch, side^2, channels x patch x patch], and each patch's (x, y)
    column and row in pixel_position_ids [batch, side^2, 2], row by row; side is twice the
    pooling_kernel_size, so that the pooler averages whole k x k blocks of patches."""
    patch = getattr(config, "patch_size", None)
    if not isinstance(patch, int) or patch <= 0:
        raise CaptureError(f"cannot make pixel_values for {type(model).__name__}, which reads pixel_position_ids: "
                           "its config has no patch_size; pass example_inputs=(x,)")
    kernel = getattr(config, "pooling_kernel_size", None)
    side = 2 * (kernel if isinstance(kernel, int) and kernel > 0 else 1)
    channels = getattr(config, "num_channels", None) or 3
    grid = tuple((x, y) for y in range(side) for x in range(side))
    return [InputSpec("pixel_values", (batch, side * side, channels * patch * patch), dtype),
            InputSpec("pixel_position_ids", (batch, side * side, 2), torch.long, fill=grid)]


def _patches(config, image: InputSpec) -> int | None:
    """How many patches a ViT-style model cuts `image` into, None when its config does not say."""
    patch = getattr(config, "patch_size", None)
    if not isinstance(patch, int) or patch <= 0 or len(image.shape) != 4:
        return None
    return (image.shape[2] // patch) * (image.shape[3] // patch)


def _features(model: nn.Module, config, batch: int, seq: int, dtype: torch.dtype) -> InputSpec:
    mel = getattr(config, "num_mel_bins", None)
    window = getattr(config, "n_window", None)
    if mel and isinstance(window, int) and window > 0:
        # an encoder that cuts its features into chunks of 2 x n_window frames (Qwen3-ASR's, whose
        # 2-d convolutions read each chunk as [bins, frames]): whole chunks, as many as `seq` needs
        stride = math.prod(m.stride[0] for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
        chunk = 2 * window
        return InputSpec("input_features", (batch, mel, chunk * max(1, -(-seq * stride // chunk))), dtype,
                         dynamic=(0,))
    if mel and not any(isinstance(m, nn.Conv1d) and m.in_channels == mel for m in model.modules()):
        # no convolution reads the mel bins as channels: frames first, bins last (Parakeet, LASR),
        # as many as its subsampling (the config's subsampling_factor, else its convolutions: 1-d,
        # or 2-d over [time, bins]) turns into `seq`
        stride = getattr(config, "subsampling_factor", None)
        if not (isinstance(stride, int) and stride > 0):
            stride = math.prod(m.stride[0] for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
        # a config's input_size: frames stacked by the feature extractor (Fun-ASR: 7 x the bins)
        width = getattr(config, "input_size", None)
        width = width if isinstance(width, int) and width >= mel else (_read_width(model, batch, seq * stride, mel, dtype)
                                                                         or mel)
        return InputSpec("input_features", (batch, seq * stride, width), dtype, dynamic=(0, 1))
    if mel:
        stride = _conv_stride(_encoder(model) or model)
        positions = getattr(config, "max_source_positions", None)
        if positions:  # Whisper's encoder checks that it got exactly these frames
            return InputSpec("input_features", (batch, mel, positions * stride), dtype)
        return InputSpec("input_features", (batch, mel, seq * stride), dtype, dynamic=(0, 2))
    width = getattr(config, "feature_projection_input_dim", None) or (
        (getattr(config, "input_feat_per_channel", 0) or 0) * (getattr(config, "input_channels", None) or 1))
    if not width:  # frames first, as wide as the first Linear the forward reaches needs (Gemma 4's audio)
        stride = math.prod(m.stride[0] for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
        width = _read_width(model, batch, seq * stride, _PROBE_BINS, dtype)
        if width:
            return InputSpec("input_features", (batch, seq * stride, width), dtype, dynamic=(0, 1))
        raise CaptureError(f"cannot make input_features for {type(model).__name__}: its config names neither "
                           "num_mel_bins nor a feature size; pass example_inputs=(x,)")
    stride = _conv_stride(_encoder(model) or model)
    return InputSpec("input_features", (batch, seq * max(stride, 1), width), dtype, dynamic=(0, 1))


_PROBE_BINS = 64  # the bins a probe feeds a model whose config does not say how many it reads


def _read_width(model: nn.Module, batch: int, frames: int, guess: int, dtype: torch.dtype) -> int | None:
    """How wide a frame `model` reads as [batch, frames, width] where the config does not say, from
    the first Linear its forward reaches: fed frames of `guess` bins, that Linear gets a width in
    proportion to them (the frames as they come: Granite Speech 5's, each mel frame with its delta
    and two stacked, 4 x the bins; or the bins its 2-d convolutions subsample, times their channels:
    Gemma 4's audio tower), and the width it is sized for follows. None where the probe cannot tell
    (a forward that fails before any Linear, or whose Linear still does not fit at that width). The
    probe is the model's own forward on zeros, stopped at that Linear (on the meta device for a model
    whose weights are there)."""
    def first_linear(width: int) -> tuple[nn.Linear, int] | None:
        reached: list[tuple[nn.Linear, torch.Tensor]] = []

        def hook(module, args):
            reached.append((module, args[0] if args else None))
            raise _Reached

        params = [*model.parameters()]
        device = torch.device("meta") if params and params[0].device.type == "meta" else model_device(model)
        x = torch.zeros(batch, frames, width, dtype=dtype, device=device)
        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
        if not _run_probe(model, {main_input_param(model) or "input_features": x}, handles):
            return None
        if not reached or not isinstance(reached[0][1], torch.Tensor) or reached[0][1].dim() < 2:
            return None
        return reached[0][0], reached[0][1].shape[-1]

    seen = first_linear(guess)
    if seen is None or seen[1] == seen[0].in_features or (guess * seen[0].in_features) % seen[1]:
        return None
    width = guess * seen[0].in_features // seen[1]
    again = first_linear(width)  # the width is right only if that Linear now gets what it is sized for
    return width if again is not None and again[1] == again[0].in_features else None


def _frame_mask(model: nn.Module, main: InputSpec) -> list[InputSpec]:
    """An all-valid mask over the frames of `main` ([batch, frames]) where forward takes one
    named after it (`input_features_mask`: Qwen3-ASR, Fun-ASR, Audio Flamingo 3, whose encoders
    read their lengths from it), of the dtype its annotation names (bool for a BoolTensor, else
    integer ones as a feature extractor returns them)."""
    param = inspect.signature(model.forward).parameters.get(f"{main.name}_mask")
    if param is None:
        return []
    axis = main.dynamic[1] if len(main.dynamic) > 1 else len(main.shape) - 1
    dtype = torch.bool if "BoolTensor" in str(param.annotation) else torch.long
    dynamic = (0, 1) if axis in main.dynamic else (0,)
    return [InputSpec(param.name, (main.shape[0], main.shape[axis]), dtype, dynamic=dynamic, fill=(1,))]


def _values(model: nn.Module, config, batch: int, seq: int, dtype: torch.dtype) -> InputSpec:
    mel, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if mel and frames and not kernels:
        return InputSpec("input_values", (batch, frames, mel), dtype)
    samples = _DEFAULT_SAMPLES
    if kernels and strides:
        # samples the feature encoder turns into `seq` frames: its receptive field, then one hop per frame
        receptive, hop = 1, 1
        for k, s in zip(kernels, strides):
            receptive += (k - 1) * hop
            hop *= s
        samples = receptive + (seq - 1) * hop
    per_token = getattr(config, "samples_per_token", None)
    if isinstance(per_token, int) and per_token > 0:  # an encoder that reads whole tokens' samples (Muse Spark)
        samples = seq * per_token
    channels = _read_channels(model, batch, samples, dtype)
    audio = getattr(config, "audio_channels", None) or getattr(config, "channels", None)
    if isinstance(channels, int) and isinstance(audio, int) and channels > audio:
        # the convolution reads more channels than the audio has: latents, whatever the model
        # declares (VibeVoice's decoder inherits input_values): [batch, channels, seq frames]
        return InputSpec("input_values", (batch, channels, seq), dtype, dynamic=(0, 2))
    if channels is None and not (kernels and strides):
        channels = getattr(config, "audio_channels", None)
    if isinstance(channels, int) and channels > 0:  # audio codecs read [batch, channels, samples]
        return InputSpec("input_values", (batch, channels, samples), dtype, dynamic=(0, 2))
    return InputSpec("input_values", (batch, samples), dtype, dynamic=(0, 1))


def _latents(model: nn.Module, config, batch: int, seq: int, dtype: torch.dtype) -> InputSpec:
    """An audio decoder's latents: [batch, channels, seq frames], as many channels as its first
    convolution reads (Mimi's and Pocket TTS's decoders), else the hidden size."""
    channels = _read_channels(model, batch, seq, dtype) or _vocab(config, "hidden_size", "d_model")
    if channels is None:
        raise CaptureError(f"cannot make latents for {type(model).__name__}: no convolution reads them and its config "
                           "has no hidden_size; pass example_inputs=(x,)")
    return InputSpec("latents", (batch, channels, seq), dtype, dynamic=(0, 2))


class _Reached(Exception):
    """Raised by a probe's hook at the module it looks for (the first convolution, a tower's
    patch embedding), to stop the forward there."""


def _run_probe(model: nn.Module, kwargs: dict, handles: list) -> bool:
    """Run `model(**kwargs)` in eval mode without gradients until a probe hook raises `_Reached`;
    False when the forward fails before that (the config decides then). Restores the mode and
    removes `handles` either way."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**kwargs)
    except _Reached:
        pass
    except Exception:  # a forward that cannot run on the probe
        return False
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return True


def _read_channels(model: nn.Module, batch: int, samples: int, dtype: torch.dtype) -> int | None:
    """How many channels `model` reads its main input with, as [batch, channels, samples], when
    it hands that input to its first 1-d convolution without a channel axis (codecs: DAC, EnCodec,
    VibeVoice; audio decoders' latents); None when it adds the channel axis itself (wav2vec2 and
    its kin read [batch, samples]) or the probe cannot tell. The probe is the model's own forward
    on [batch, samples] zeros, stopped at the first convolution it reaches (on the meta device for
    a model whose weights are there)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    if not convs:
        return None
    reached: list[tuple[nn.Conv1d, torch.Tensor]] = []

    def hook(module, args):
        reached.append((module, args[0]))
        raise _Reached

    params = [*model.parameters()]
    device = torch.device("meta") if params and params[0].device.type == "meta" else model_device(model)
    x = torch.zeros(batch, samples, dtype=dtype, device=device)
    param = main_input_param(model) or "input_values"
    handles = [c.register_forward_pre_hook(hook) for c in convs]
    if not _run_probe(model, {param: x}, handles):
        return None
    if not reached:
        return None
    conv, got = reached[0]
    # a 2-d input is one unbatched [channels, samples] to a convolution: the batch read as channels
    return conv.in_channels if isinstance(got, torch.Tensor) and got.dim() == 2 else None


def _series(config, names: set[str], batch: int, dtype: torch.dtype, required: set[str] = frozenset()
            ) -> list[InputSpec]:
    context = getattr(config, "context_length", None) or DEFAULT_SEQ
    channels = getattr(config, "num_input_channels", None)
    if isinstance(channels, int) and channels > 0:  # patch models: [batch, time, channels]
        return [InputSpec("past_values", (batch, context, channels), dtype)]
    lags = getattr(config, "lags_sequence", None) or [0]
    length = context + max(lags)
    size = getattr(config, "input_size", None) or 1
    values = (batch, length) if size == 1 else (batch, length, size)
    specs = [InputSpec("past_values", values, dtype)]
    if "past_time_features" in names:
        specs.append(InputSpec("past_time_features", (batch, length, getattr(config, "num_time_features", 0) or 0), dtype))
    if "past_observed_mask" in names:
        specs.append(InputSpec("past_observed_mask", values, dtype, fill=(1,)))
    # TimesFM requires these (TimesFM 2.5 takes the padding optionally, no padding by default):
    # no step is padding; each series of frequency class 0 (high frequency)
    if "past_values_padding" in required:
        specs.append(InputSpec("past_values_padding", values, dtype, fill=(0,)))
    if "freq" in required:
        specs.append(InputSpec("freq", (batch, 1), torch.long, fill=(0,)))
    return specs


def _trajectory(config, names: set[str], batch: int, seq: int, dtype: torch.dtype) -> list[InputSpec]:
    """An episode for a Decision Transformer: states, actions and returns-to-go per step, the
    steps' timesteps (below max_ep_len) and a mask of ones."""
    steps = (batch, seq)
    specs = [InputSpec("states", (*steps, config.state_dim), dtype, dynamic=(0, 1))]
    if "actions" in names:
        specs.append(InputSpec("actions", (*steps, config.act_dim), dtype, dynamic=(0, 1)))
    if "returns_to_go" in names:
        specs.append(InputSpec("returns_to_go", (*steps, 1), dtype, dynamic=(0, 1)))
    if "timesteps" in names:
        high = getattr(config, "max_ep_len", None) or seq
        specs.append(InputSpec("timesteps", steps, torch.long, high=high, dynamic=(0, 1)))
    if "attention_mask" in names:
        specs.append(InputSpec("attention_mask", steps, torch.long, dynamic=(0, 1)))
    return specs


def _patch_grid(model: nn.Module, config, names: set[str], main: str, batch: int,
                dtype: torch.dtype) -> list[InputSpec]:
    """Patches of `batch` images and their grid (see the module docstring), each row of the
    patches in the layout the tower's patch embedding reads (`_patch_layouts`)."""
    patch = getattr(config, "patch_size", None)
    if not isinstance(patch, int) or patch <= 0:
        raise CaptureError(f"cannot make {main} for {type(model).__name__}: its config has no patch_size; "
                           "pass example_inputs=(x,)")
    temporal = getattr(config, "temporal_patch_size", None) or getattr(config, "patch_temporal", None) or 1
    channels = getattr(config, "in_channels", None) or getattr(config, "num_channels", None) or 3
    merge = getattr(config, "spatial_merge_size", None) or 1
    side = 2 * merge
    grid = [InputSpec(_grid_input(names), (batch, 3), torch.long, dynamic=(), fill=(1, side, side),
                      static_values=True)]
    if "merge_sizes" in names:
        grid.append(InputSpec("merge_sizes", (batch,), torch.long, dynamic=(), fill=(merge,), static_values=True))
    embed = _patch_embedding(model)
    layouts = _patch_layouts(embed, channels * temporal * patch * patch, patch, merge)
    candidates = [[InputSpec(main, (batch * side * side, *row), dtype, dynamic=()), *grid] for row in layouts]
    if len(candidates) > 1:
        for specs in candidates:
            if _reaches(model, specs, embed):
                return specs
    return candidates[0]  # none reads: the flat rows, whose error then names what the tower expected


def _packed_patches(model: nn.Module, config, batch: int, dtype: torch.dtype) -> list[InputSpec]:
    """A NaViT-style tower's input (MiniCPM-V, MiniCPM-OCR): `batch` images of side x side
    patches, packed as its image processor packs them, every patch side by side in one row
    [1, channels, patch, batch * side^2 * patch], and their target_sizes [batch, 2] (side, side);
    side is twice the merger's window (window_kernel_size, else 2), so that the window merge and
    the 2 x 2 downsampling after it both divide the grid."""
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) and patch else patch
    if not isinstance(patch, int) or patch <= 0:
        raise CaptureError(f"cannot make pixel_values for {type(model).__name__}: its config has no patch_size; "
                           "pass example_inputs=(x,)")
    window = getattr(config, "window_kernel_size", None)
    window = max(window) if isinstance(window, (list, tuple)) and window else 2
    side = 2 * window
    channels = getattr(config, "num_channels", None) or 3
    return [InputSpec("pixel_values", (1, channels, patch, batch * side * side * patch), dtype, dynamic=()),
            InputSpec(SIZES_INPUT, (batch, 2), torch.long, dynamic=(), fill=(side, side), static_values=True)]


_EMBEDDINGS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _patch_embedding(model: nn.Module) -> nn.Module | None:
    """A vision tower's patch embedding: its first Linear or convolution (the tower builds its
    patch embedding first, the first module its forward hands the patches to)."""
    return next((m for m in model.modules() if isinstance(m, _EMBEDDINGS)), None)


def _patch_layouts(embed: nn.Module | None, flat: int, patch: int, merge: int) -> list[tuple[int, ...]]:
    """The shapes one row of patches may take, from what the patch embedding consumes: the flat
    row of `flat` values first (towers that view it as they need: Qwen2-VL and most); a
    convolution's input window [in_channels, *kernel] (a tower that hands the rows to its
    convolution as they are: Kimi K2.5); for a Linear over one patch of c channels
    (in_features = c * patch^2) the merge x merge patches of one merged token as an image,
    channels last [merge * patch, merge * patch, c] (Inkling 2), the grid then counting
    merged tokens, so a row per grid cell as in the other layouts."""
    layouts = [(flat,)]
    if isinstance(embed, nn.Linear) and embed.in_features % (patch * patch) == 0:
        layouts.append((merge * patch, merge * patch, embed.in_features // (patch * patch)))
    elif isinstance(embed, _EMBEDDINGS) and embed.groups == 1:
        layouts.append(tuple(embed.weight.shape[1:]))
    return list(dict.fromkeys(layouts))


def _reaches(model: nn.Module, specs: list[InputSpec], embed: nn.Module) -> bool:
    """Whether the tower's forward, fed `specs`, gets its patches through its patch embedding
    (False on any error before). It runs on fake weights, as capture traces (so a tower on the
    meta device is probed alike, and nothing touching a weight is computed), and is stopped
    once the embedding has run."""
    from .capture import _fake_mode, _fake_weights  # capture imports this module

    device = model_device(model)
    generator = torch.Generator().manual_seed(0)
    inputs = {s.name: s.make(generator, device) for s in specs}

    def stop(*_):
        raise _Reached

    handle = embed.register_forward_hook(stop)
    try:
        with torch.no_grad(), _fake_weights(model, _fake_mode(), device):
            model(**inputs)
    except _Reached:
        return True
    except Exception:  # a layout the tower cannot read fails in its own code, in any way
        return False
    finally:
        handle.remove()
    return True  # the forward ran through without the embedding: it read the patches all the same


def input_specs(model: nn.Module, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ) -> list[InputSpec]:
    """The inputs to feed `model` (see the module docstring), main input first."""
    config = getattr(model, "config", None)
    main = main_input_name(model) if config is not None else None
    if main is None:
        raise CaptureError(
            f"cannot make example inputs for {type(model).__name__}: it has no Hugging Face config naming its "
            "inputs (token ids, pixel values or audio); pass example_inputs=(x,)"
        )
    names, _ = _forward_params(model)
    dtype = _float_dtype(model)
    specs: list[InputSpec] = []
    if main == "input_ids":
        vocab = _vocab(config, "vocab_size", "src_vocab_size") or _tokenizer_vocab(config)
        if vocab is None:
            raise CaptureError(f"cannot make input_ids for {type(model).__name__}: its config has no vocab_size; "
                               "pass example_inputs=(x,)")
        specs.append(InputSpec("input_ids", (batch, seq), torch.long, high=vocab, dynamic=(0, 1)))
        if "attention_mask" in names:
            specs.append(InputSpec("attention_mask", (batch, seq), torch.long, dynamic=(0, 1)))
        if "bbox" in names:
            specs.append(_bbox(config, batch, seq, dtype))
        feats, pos = getattr(config, "visual_feat_dim", None), getattr(config, "visual_pos_dim", None)
        if "visual_feats" in names and isinstance(feats, int) and isinstance(pos, int):
            # LXMERT's image: detected regions' features and boxes (as many regions as tokens)
            specs.append(InputSpec("visual_feats", (batch, seq, feats), dtype, dynamic=(0, 1)))
            specs.append(InputSpec("visual_pos", (batch, seq, pos), dtype, dynamic=(0, 1)))
        if "pixel_values" in names and isinstance(getattr(config, "image_size", None), (int, list, tuple)):
            # a vision-and-language model whose own config sizes its image (ViLT): the image too
            specs.append(_image(config, batch, dtype))
        languages = getattr(config, "languages", None)
        if "lang_ids" in names and isinstance(languages, (list, tuple)) and languages:
            # X-MOD's language adapters: each sequence in the configured default language (else the first)
            default = getattr(config, "default_language", None)
            index = list(languages).index(default) if default in languages else 0
            specs.append(InputSpec("lang_ids", (batch,), torch.long, fill=(index,)))
    elif main == "pixel_values" and SIZES_INPUT in names:
        specs.extend(_packed_patches(model, config, batch, dtype))
    elif main in ("hidden_states", "pixel_values") and _grid_input(names):
        specs.extend(_patch_grid(model, config, names, main, batch, dtype))
    elif main == "inputs_embeds":  # a model fed another's states (Nemotron 3.5's word-timestamp head)
        width = _vocab(config, "hidden_size", "d_model")
        if width is None:
            raise CaptureError(f"cannot make inputs_embeds for {type(model).__name__}: its config has no hidden_size; "
                               "pass example_inputs=(x,)")
        specs.append(InputSpec("inputs_embeds", (batch, seq, width), dtype, dynamic=(0, 1)))
    elif main in ("pixel_values", "pixel_values_videos"):
        specs.append(_image(config, batch, dtype, main))
        patches = _patches(config, specs[-1])
        if "noise" in names and patches:
            # masked autoencoders (ViT-MAE) draw a random mask per call unless given its noise:
            # seeded noise makes the forward a function of its inputs, so outputs can be compared
            specs.append(InputSpec("noise", (batch, patches), dtype))
        if "spatial_shapes" in names:
            specs[0:1] = _patch_sequence(config, batch, dtype, names)
        if "pixel_position_ids" in names:
            specs[0:1] = _positioned_patches(model, config, batch, dtype)
        if "prompt_pixel_values" in names and len(specs[0].shape) == 4:
            # SegGPT: the configured image is a canvas of the prompt stacked on the input, half as high each
            b, c, h, w = specs[0].shape
            specs[0] = InputSpec(specs[0].name, (b, c, h // 2, w), dtype)
            specs.extend(InputSpec(name, specs[0].shape, dtype) for name in ("prompt_pixel_values", "prompt_masks")
                         if name in names)
    elif main == "input_features":
        specs.append(_features(model, config, batch, seq, dtype))
        specs.extend(_frame_mask(model, specs[-1]))
    elif main == "past_values":
        specs.extend(_series(config, names, batch, dtype, _required(model)))
    elif main == "latents":
        specs.append(_latents(model, config, batch, seq, dtype))
    elif main == "states":
        specs.extend(_trajectory(config, names, batch, seq, dtype))
    elif main == "query_embeds":  # BLIP-2's Q-Former: learned queries reading an image encoder's states
        specs.append(InputSpec("query_embeds", (batch, seq, config.hidden_size), dtype, dynamic=(0, 1)))
        width = getattr(config, "encoder_hidden_size", None)
        if "encoder_hidden_states" in names and isinstance(width, int) and width > 0:
            specs.append(InputSpec("encoder_hidden_states", (batch, seq, width), dtype, dynamic=(0, 1)))
    elif main == "input_values":
        specs.append(_values(model, config, batch, seq, dtype))
    elif main == "noise_embeds":
        specs.extend(_draft_block(model, config, names, batch, seq, dtype))
    else:
        raise CaptureError(f"cannot make example inputs for {type(model).__name__}: its main input {main} is not a "
                           "kind sparsify makes (token ids, pixel values, audio, features, latents, time series); "
                           "pass example_inputs=(x,)")
    param = main_input_param(model)
    if param != specs[0].name:  # the declared kind, under the forward's own name for it
        specs[0] = dataclasses.replace(specs[0], name=param)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in names:
        vocab = _vocab(config, "tgt_vocab_size", "vocab_size")
        specs.append(InputSpec("decoder_input_ids", (batch, seq), torch.long, high=vocab or 2, dynamic=(0, 1)))
    missing = _required(model) - {s.name for s in specs}
    if missing:
        raise CaptureError(
            f"cannot make example inputs for {type(model).__name__}: its forward also requires "
            f"{', '.join(sorted(missing))}, which its config does not describe; pass example_inputs=(x,)"
        )
    return specs


def _draft_block(model: nn.Module, config, names: set[str], batch: int, seq: int, dtype: torch.dtype
                 ) -> list[InputSpec]:
    """A block-diffusion drafter's inputs (DFlash: Muse Glimmer's assistant): the embeddings of
    one block of block_size tokens to denoise [batch, block_size, hidden_size], and the target
    model's states at its target_layer_ids, concatenated [batch, seq, hidden_size x layers]."""
    width = _vocab(config, "hidden_size")
    layers = getattr(config, "target_layer_ids", None)
    if width is None:
        raise CaptureError(f"cannot make noise_embeds for {type(model).__name__}: its config has no hidden_size; "
                           "pass example_inputs=(x,)")
    block = _vocab(config, "block_size") or seq
    specs = [InputSpec("noise_embeds", (batch, block, width), dtype)]
    if "context_hidden_states" in names:
        if not isinstance(layers, (list, tuple)) or not layers:
            raise CaptureError(f"cannot make context_hidden_states for {type(model).__name__}: its config names no "
                               "target_layer_ids whose states they concatenate; pass example_inputs=(x,)")
        specs.append(InputSpec("context_hidden_states", (batch, seq, width * len(layers)), dtype, dynamic=(0, 1)))
        if "attention_mask" in names:
            # over the keys: the context's positions, then the block's (without it the drafter's
            # mask would span the block alone, and an export fails to broadcast it over the keys)
            specs.append(InputSpec("attention_mask", (batch, seq + block), torch.long, dynamic=(0, 1)))
    return specs


def _required(model: nn.Module) -> set[str]:
    """The arguments forward cannot do without (no default)."""
    params = inspect.signature(model.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}


def example_inputs_for(
    model: nn.Module, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ, seed: int = 0
) -> dict[str, Any]:
    """Seeded keyword inputs for `model` (see `input_specs`), plus its `fixed_options`, on the
    model's device (the CPU for a model on the meta device)."""
    specs = input_specs(model, batch, seq)
    g = torch.Generator().manual_seed(seed)
    device = model_device(model)
    kwargs: dict[str, Any] = {s.name: s.make(g, device) for s in specs}
    return {**kwargs, **fixed_options(model)}


def fixed_options(model: nn.Module) -> dict[str, bool]:
    """Options every call of `model` is given: `use_cache=False` where its config has use_cache
    and its forward takes it (by name, or through **kwargs that are untyped or declare it: a
    forward whose typed **kwargs do not may pass its own, Mimi's encoder, and one more would be a
    second value for the same keyword); `sample=False` where forward samples by default (a
    sigma-VAE, VibeVoice's tokenizer, draws noise into its latents), so that it is a function of
    its inputs."""
    names, any_kwarg = _forward_params(model)
    out: dict[str, bool] = {}
    if hasattr(getattr(model, "config", None), "use_cache") and ("use_cache" in names or any_kwarg):
        out["use_cache"] = False
    sample = inspect.signature(model.forward).parameters.get("sample")
    if sample is not None and sample.default is True:
        out["sample"] = False
    return out
