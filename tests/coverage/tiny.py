"""Tiny configs for any family: the known size fields of its default config, shrunk.

`tiny_config(model_type)` builds the family's default config with every size field it has
(width, FFN width, depth, heads, vocabulary, positions, image and audio sizes) set small, token
ids moved inside the small vocabulary, and the family's own overrides (`OVERRIDES`) last. Only
fields the config has are set, and only downwards, so a family with unusual fields still gets a
valid (if larger) config instead of a broken one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_config", "SIZES", "OVERRIDES", "VOCAB"]

VOCAB = 128
_HIDDEN, _FFN, _LAYERS, _HEADS, _KV_HEADS, _HEAD_DIM = 32, 64, 2, 4, 2, 8

SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "embedding_size", "word_embed_proj_dim",
                     "dim", "projection_dim", "classifier_proj_size", "text_hidden_size", "encoder_hidden_size",
                     "decoder_hidden_size", "hidden_size_global"), _HIDDEN),
    **dict.fromkeys(("intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
                     "mlp_dim", "hidden_dim", "d_inner", "decoder_intermediate_size", "encoder_feedforward_dim",
                     "dim_feedforward", "encoder_hidden_dim"), _FFN),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers",
                     "encoder_layers", "decoder_layers", "num_encoder_layers", "depth", "decoder_num_hidden_layers"),
                    _LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "attention_heads", "decoder_num_attention_heads"), _HEADS),
    **dict.fromkeys(("num_key_value_heads",), _KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "d_head", "kv_channels", "attention_head_size"), _HEAD_DIM),
    **dict.fromkeys(("rotary_dim",), _HEAD_DIM // 2),
    **dict.fromkeys(("vocab_size", "src_vocab_size", "tgt_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"), 512),
    # Whisper's encoder takes exactly 2 x max_source_positions mel frames
    **dict.fromkeys(("max_source_positions",), 64),
    **dict.fromkeys(("image_size", "crop_size"), 32),
    # V-JEPA 2 reads frames_per_clip frames
    **dict.fromkeys(("frames_per_clip",), 4),
    **dict.fromkeys(("patch_size",), 8),
    **dict.fromkeys(("num_mel_bins",), 16),
    # time-series models read context_length steps (TimesFM 2.5's default is 16384)
    **dict.fromkeys(("context_length",), 64),
    # the audio spectrogram transformer reads max_length frames
    **dict.fromkeys(("max_length",), 64),
    # Mamba-2 mixers of hybrid models (Bamba, ...): heads x head width = expand x hidden
    **dict.fromkeys(("mamba_n_heads",), 4),
    **dict.fromkeys(("mamba_d_head",), 16),
}

# Per-stage lists of vision models (Swin, ConvNeXt, PVT, ...): one block per stage, narrow stages.
_STAGE_LISTS = {
    "depths": lambda n: [1] * n,
    "hidden_sizes": lambda n: [16 * 2**i for i in range(n)],
    "embed_dims": lambda n: [16 * 2**i for i in range(n)],
    # one head per stage divides any stage width (Swin2SR keeps one width for every stage)
    "num_heads": lambda n: [1] * n,
    "num_attention_heads": lambda n: [1] * n,
    # the convolutional feature encoder of wav2vec2 and its kin
    "conv_dim": lambda n: [32] * n,
}
# depth fields that a stage list sets (ConvNeXt's num_hidden_layers is its number of stages)
_DEPTH = {"num_hidden_layers", "num_layers", "num_stages", "depth"}

# Family fixes, only where a field depends on another that the generic shrink changed.
OVERRIDES: dict[str, dict[str, Any]] = {
    # attention_types expands to one entry per layer and must match num_layers
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # the depth is block_sizes (num_hidden_layers is their sum and cannot be set)
    "funnel": {"block_sizes": [1, 1]},
    # ESM's default config has no vocabulary (each checkpoint sets its own: 33 amino-acid tokens)
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32},
    # Swin's last stage must still hold a whole 2x2 window: 64 px / patch 4 / 2^3 = 2
    **dict.fromkeys(("swin", "donut-swin", "swinv2"), {"image_size": 64}),
    # the axial position factors must sum to the hidden size
    "reformer": {"axial_pos_embds_dim": [16, 16]},
    # time-series models have no default forecast horizon
    **dict.fromkeys(("autoformer", "informer", "time_series_transformer"), {"prediction_length": 4}),
    # Mamba-2's heads x head width must equal expand (2) x hidden
    "mamba2": {"num_heads": 8, "head_dim": 8},
    # ESMC has no grouped-query attention: as many key/value heads as query heads
    "esmc": {"num_key_value_heads": _HEADS},
    # a quarter of the head rotates, in pairs of pairs: the head must be a multiple of 16
    "neomme": {"head_dim": 16},
    # the last layers share the key/value cache of earlier ones; none of the tiny model's do
    # (its first layers' FFNs keep the top 5% of activations, not an elementwise activation and
    # so not converted: one such layer, then three that convert, as in the full model's later layers)
    "gemma3n_text": {"num_kv_shared_layers": 0, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},
    # V-JEPA 2's predictor has sizes of its own
    "vjepa2": {"pred_hidden_size": 32, "pred_num_attention_heads": 4, "pred_num_hidden_layers": 2},
    # Zamba's hybrid layers share one transformer block, which transformers ties from the first
    # hybrid layer into the others: the tiny model needs two of them to have something to tie
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    # BiT's group norms have 32 groups; the tiny stages are 16 channels wide
    "bit": {"num_groups": 2},
    # one gated-delta-net layer, not two: its reference chunked kernel unrolls a 63-step loop per
    # layer, which ONNX export and its optimiser take minutes over on one core (sweep timeout 300 s)
    **dict.fromkeys(("olmo_hybrid", "qwen3_5_text"), {"num_hidden_layers": 2,
                                                      "layer_types": ["linear_attention", "full_attention"]}),
    # the decoder's upsampling is depthwise: one group per channel of the (shrunk) hidden size
    **dict.fromkeys(("mimi", "mimi_decoder", "pocket_tts_audio_tokenizer", "pocket_tts_audio_tokenizer_decoder"),
                    {"upsample_groups": _HIDDEN}),
    # these audio encoders have as many key/value heads as query heads (their default configs);
    # grouped queries without a mask take SDPA's enable_gqa path, which torch.export cannot trace
    **dict.fromkeys(("nemotron3_5_transcribe_asr_audio", "nemotron3_diarization_audio"),
                    {"num_key_value_heads": _HEADS}),
    # the flow head is conditioned on the backbone's hidden states: as wide as the shrunk backbone
    "pocket_tts": {"flow_head_config": {"hidden_size": _HIDDEN, "num_hidden_layers": _LAYERS, "condition_dim": _HIDDEN}},
    # the flow head as wide as the backbone (above), and no grouped queries, as in its default
    # config: the conversion of its saved (original-format) attention weights permutes them by
    # query heads, which transformers' own reload of the tiny checkpoint also fails on
    "gradium_phonon_tts": {"flow_head_config": {"hidden_size": _HIDDEN, "num_hidden_layers": _LAYERS,
                                                "condition_dim": _HIDDEN}, "num_key_value_heads": _HEADS},
    # the CTC blank is the last class, which the config checks is inside the (shrunk) vocabulary
    # (and, as its audio encoder, no grouped queries in its default config)
    "nemotron3_5_transcribe_word_timestamp": {"blank_token_id": VOCAB - 1, "num_key_value_heads": _HEADS},
    # no projections around the quantizer: the codebook is as wide as the hidden size
    **dict.fromkeys(("wavtokenizer", "wavtokenizer_encoder"), {"codebook_dim": _HIDDEN}),
    # the top convolution is round_filters(1280) wide by the width coefficient, which hidden_dim
    # (its norm and the classifier) must equal: 128 at a tenth of the width, one block per stage
    "efficientnet": {"width_coefficient": 0.1, "depth_coefficient": 0.3, "hidden_dim": 128, "initializer_range": 0.7},
    # the stages are sized by stage_*_channels, chained stem -> stage 1 -> ...; hidden_sizes (the
    # classifier's input) must be their outputs
    "hgnet_v2": {"stem_channels": [3, 16, 16], "embedding_size": 16, "stage_in_channels": [16, 16, 32, 64],
                 "stage_mid_channels": [16, 16, 32, 32], "stage_out_channels": [16, 32, 64, 128],
                 "stage_num_blocks": [1, 1, 1, 1], "stage_numb_of_layers": [2, 2, 2, 2], "initializer_range": 0.15},
    # the stem's output is the first stage's input (hidden_sizes[0])
    "textnet": {"stem_out_channels": 16},
    # LeViT's patch embedding is four stride-2 convolutions whatever patch_size says (16 px a
    # patch), and each stage halves the grid: 64 px make 4x4 patches, then 2x2 and 1x1
    # (BatchNorm weights are drawn with initializer_range, here and in EfficientNet and MobileViT:
    # at 0.02 the activations vanish through the stack, so the tiny models draw them wider)
    "levit": {"image_size": 64, "patch_size": 16, "initializer_range": 0.2},
    # the six box embeddings (x, y, w, h of a bounding box) are hidden_size // 6 wide each and
    # concatenated back to hidden_size: a width divisible by 6 (and by the channel shrink, 4)
    "lilt": {"hidden_size": 48, "head_dim": 12},
    # four coordinate and two shape embeddings concatenate to the hidden size (4 x 4 + 2 x 8 = 32)
    "layoutlmv3": {"coordinate_size": 4, "shape_size": 8, "input_size": 32},
    "mobilevit": {"initializer_range": 0.25},
    # SigLIP 2 reads images as sequences of num_patches patches (a 4 x 4 grid)
    "siglip2_vision_model": {"num_patches": 16},
    # SegGPT's image is a canvas of the prompt stacked on the input: twice as high as wide
    "seggpt": {"image_size": [64, 32]},
    # LXMERT's depths are per stream (language, cross-modality, regions); its region features 2048 wide
    "lxmert": {"l_layers": 2, "x_layers": 1, "r_layers": 1, "visual_feat_dim": 64},
    # Perceiver's latent array has sizes of its own (1280 wide, 26 self-attentions)
    "perceiver": {"num_latents": 16, "d_latents": 32, "num_self_attends_per_block": 2, "num_self_attention_heads": 4,
                  "num_cross_attention_heads": 4},
    # BROS embeds each of its 8 box coordinates sinusoidally in hidden_size / 4 / 8 dimensions,
    # taken in pairs: the width must be at least 64
    "bros": {"hidden_size": 64, "head_dim": 16},
    # five stride-2 stages: 64 px leave the last one a 2x2 map for its 2x2 patches
    "mobilevitv2": {"image_size": 64, "initializer_range": 0.2},
    # Hiera's stages are embed_dim_per_stage wide (the first is hidden_size); a global-attention
    # block may not be a stage's first (its query pooling divides by the window size)
    "sam2_hiera_det_model": {"image_size": [64, 64], "embed_dim_per_stage": [32, 64, 128, 256],
                             "blocks_per_stage": [1, 1, 2, 1], "global_attention_blocks": [3],
                             "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [8, 4, 2, 2]},
    # the default has no RoPE parameters at all, and the rotary embedding reads one set per layer
    # type (with its multimodal sections, which sum to half the head: 8 = 32 / 4 heads)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [2, 1, 1]}}},
    # the image is cut into num_windows square windows of whole patches (32 px: 2 x 2 windows)
    "lw_detr_vit": {"num_windows": 4},
    # the last stage of the convolutional backbone is the transformer's width (hidden_size); the
    # 2-d rotary embedding is hidden_size / 4 wide, 4 x head_dim by its partial factor: 8 heads
    "efficientloftr": {"out_features": [16, 16, 32, 32], "stage_num_blocks": [1, 1, 1, 1],
                       "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 4},
    # its attention projects keys and values to every head (no grouped heads): as many as the queries
    "granite_speech5_encoder": {"num_key_value_heads": 4},
    # the window-attention merger runs after layer insert_layer_id (6 of 27 in the checkpoints):
    # after the first of the two tiny layers, so that the tiny tower runs it too
    "minicpm_ocr_vision": {"insert_layer_id": 0},
    "minicpmv4_7_vision": {"insert_layer_id": 0},
}


def _field(config, name: str) -> Any:
    """The config's value of `name`, None where it has none or it is derived (a property without
    a setter: Falcon's head_dim) or only per layer (Gemma 4's head_dim)."""
    if isinstance(getattr(type(config), name, None), property):
        return None
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' per-layer attributes raise on the global read
        return None


def _shrunk(default) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, small in SIZES.items():
        if isinstance(getattr(type(default), name, None), property):
            continue
        value = _field(default, name)
        if name == "head_dim" and value is None and isinstance(_field(default, "num_attention_heads"), int):
            out[name] = small  # a head_dim left None, which some attention layers read as is
            continue
        if name == "num_key_value_heads" and value is None and "num_key_value_heads" in vars(default):
            out[name] = small  # Nemotron's default leaves it None, which its attention divides by
            continue
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) and value > small:
            out[name] = small
        elif name == "image_size" and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            out[name] = type(value)(min(v, small) for v in value)
    if isinstance(_field(default, "qk_rope_head_dim"), int):
        # multi-head latent attention (MiniCPM3, Youtu: DeepSeek's): its own head widths and ranks;
        # the rotary part is the head_dim the rotary embedding is built for
        out.update(qk_rope_head_dim=_HEAD_DIM, qk_nope_head_dim=_HEAD_DIM, v_head_dim=_HEAD_DIM, head_dim=_HEAD_DIM,
                   num_key_value_heads=out.get("num_attention_heads", _HEADS))  # no grouped queries
        for rank, small in (("kv_lora_rank", 16), ("q_lora_rank", 32)):
            if isinstance(_field(default, rank), int):
                out[rank] = small
    if isinstance(getattr(default, "window_size", None), int) and getattr(default, "image_size", None):
        # Swin's attention windows: tiny images have 2x2 patch grids in their deepest stages
        out["window_size"] = min(default.window_size, 2)
    rope = _field(default, "rope_parameters")
    heads = out.get("num_attention_heads", _field(default, "num_attention_heads"))
    head_dim = out.get("head_dim") or (out.get("hidden_size", 0) // heads if isinstance(heads, int) else 0)
    sections = rope.get("mrope_section") if isinstance(rope, dict) else None
    if sections is None and "mrope_section" in getattr(type(default), "ignore_keys_at_rope_validation", ()):
        sections = [0, 0, 0]  # the modeling code's default has three, sized for a full head
    if isinstance(sections, (list, tuple)) and head_dim:
        # multimodal rotary sections (Qwen2-VL, GLM-4V, ...) must sum to half the head dimension
        n, total = len(sections), head_dim // 2
        out["rope_parameters"] = {**rope, "mrope_section": [total // n + (i < total % n) for i in range(n)]}
    for name, make in _STAGE_LISTS.items():
        value = _field(default, name)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            out[name] = [min(a, b) for a, b in zip(value, make(len(value)))]
            if name == "depths":  # the stages set the depth, and the width of the last one
                out = {k: v for k, v in out.items() if k not in _DEPTH | {"hidden_size"}}
    depth = _field(default, "num_hidden_layers")
    layers = out.get("num_hidden_layers")
    if isinstance(depth, int) and isinstance(layers, int) and depth > layers:
        # per-layer lists (layer_types, Zamba's layers_block_type, per-layer FFN widths, ...):
        # the first layers, plus the first layer of every kind they leave out (a hybrid's only
        # attention layer), so that the tiny model still has each kind of layer
        lists = {name: value for name, value in vars(default).items()
                 if isinstance(value, list) and len(value) == depth and not name.startswith("_") and name not in out}
        keep = set(range(layers))
        for value in lists.values():
            seen: set[str] = set()
            for i, v in enumerate(value):
                if repr(v) not in seen:
                    seen.add(repr(v))
                    keep.add(i)
        keep_sorted = sorted(keep)
        for name, value in lists.items():
            small = SIZES.get(name)
            out[name] = [min(value[i], small) if small and isinstance(value[i], int) else value[i] for i in keep_sorted]
        if lists:
            out["num_hidden_layers"] = len(keep_sorted)
    return out


def _token_ids(config, vocab: int) -> dict[str, Any]:
    """Every *_token_id / *_token_index inside the vocabulary (distinct ids from the top down)."""
    out: dict[str, Any] = {}
    free = vocab - 1
    for name in sorted(vars(config)):
        if not name.endswith(("_token_id", "_token_index")):
            continue
        value = getattr(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
            out[name], free = free, free - 1
        elif isinstance(value, list) and any(isinstance(v, int) and v >= vocab for v in value):
            out[name] = [v for v in value if isinstance(v, int) and v < vocab] or [free]
            free -= 1
    return out


def tiny_config(model_type: str, architectures: list[str] | None = None):
    """The default config of `model_type`, shrunk (see the module docstring)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    overrides = {**_shrunk(cls()), **OVERRIDES.get(model_type, {})}
    config = cls(**overrides)
    vocab = getattr(config, "vocab_size", None) or VOCAB
    for name, value in _token_ids(config, vocab).items():
        setattr(config, name, value)
    if architectures:
        config.architectures = architectures
    return config
