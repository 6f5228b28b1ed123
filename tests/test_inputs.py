"""Example inputs from a model's forward signature and config, for every kind of input: token ids
(decoder-only, encoder, encoder-decoder), pixel values (ViT, CLIP's vision tower), mel features
(Whisper, Speech2Text), raw audio (wav2vec2) and spectrograms (AST). Each kind: the shapes come
from the config, the dense model runs on them, capture of its meta-device skeleton needs no
argument, and (where this branch converts the family's FFN) an upcycle made with those inputs
returns what the dense model returned on them."""

from __future__ import annotations

import pytest
import torch
import transformers

import sparsify
from sparsify.capture import capture
from sparsify.errors import CaptureError
from sparsify.inputs import example_inputs_for, input_specs
from sparsify.io.skeleton import build_skeleton
from sparsify.verify import compare, main_output
from tests.coverage.tiny import tiny_config

# id: (model_type, class, config overrides, {input: shape at batch 2, seq 8}, this branch upcycles it)
CASES = {
    "llama": ("llama", "LlamaForCausalLM", {}, {"input_ids": (2, 8), "attention_mask": (2, 8)}, True),
    "bert": ("bert", "BertModel", {}, {"input_ids": (2, 8), "attention_mask": (2, 8)}, True),
    "t5": ("t5", "T5ForConditionalGeneration", {},
           {"input_ids": (2, 8), "attention_mask": (2, 8), "decoder_input_ids": (2, 8)}, True),
    # the configured image size and channels, not ImageNet's
    "vit": ("vit", "ViTModel", {"image_size": 24, "num_channels": 1}, {"pixel_values": (2, 1, 24, 24)}, True),
    # CLIP's towers use quick_gelu, an activation the matcher of this branch does not name yet
    "clip-vision": ("clip_vision_model", "CLIPVisionModel", {"hidden_act": "gelu"}, {"pixel_values": (2, 3, 32, 32)},
                    True),
    "clip-text": ("clip_text_model", "CLIPTextModel", {"hidden_act": "gelu"},
                  {"input_ids": (2, 8), "attention_mask": (2, 8)}, True),
    # Whisper reads exactly 2 x max_source_positions frames (its second convolution has stride 2);
    # its FFN is written inline in the layer, which this branch does not convert
    "whisper": ("whisper", "WhisperForConditionalGeneration", {"max_source_positions": 10, "num_mel_bins": 12},
                {"input_features": (2, 12, 20), "decoder_input_ids": (2, 8)}, False),
    # [batch, frames, features]: the subsampler's two stride-2 convolutions take 4 frames per position
    "speech2text": ("speech_to_text", "Speech2TextForConditionalGeneration", {},
                    {"input_features": (2, 32, 80), "decoder_input_ids": (2, 8)}, False),
    # the samples the convolutional feature encoder turns into 8 frames: 400 + 7 x 320
    "wav2vec2": ("wav2vec2", "Wav2Vec2ForCTC", {}, {"input_values": (2, 2640)}, True),
    "ast": ("audio-spectrogram-transformer", "ASTForAudioClassification", {}, {"input_values": (2, 64, 16)}, True),
}


def _config(case: str):
    model_type, cls, overrides, _, _ = CASES[case]
    config = tiny_config(model_type, [cls])
    for k, v in overrides.items():
        setattr(config, k, v)
    return getattr(transformers, cls), config


def _model(case: str):
    cls, config = _config(case)
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_follow_signature_and_config(case):
    model = _model(case)
    expected = CASES[case][3]
    assert {s.name: s.shape for s in input_specs(model)} == expected
    inputs = example_inputs_for(model)
    assert {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)} == expected
    with torch.no_grad():
        out = main_output(model(**inputs))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", list(CASES))
def test_skeleton_captures_with_config_made_inputs(case):
    cls, config = _config(case)
    captured = capture(build_skeleton(config, cls))
    linears = [n for n in captured.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears and all("nn_module_stack" in n.meta for n in linears)
    assert set(captured.kwargs) >= set(CASES[case][3])


@pytest.mark.parametrize("case", [c for c, spec in CASES.items() if spec[4]])
def test_upcycle_with_config_made_inputs_preserves_function(case):
    dense = _model(case)
    moe = sparsify.upcycle(_model(case), experts=4, top_k=2, every=1)
    assert moe.sparsify_plan.selected
    c = compare(dense, moe)
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)


def test_token_inputs_respect_the_vocabulary():
    model = _model("llama")
    ids = example_inputs_for(model, batch=4, seq=64, seed=3)["input_ids"]
    assert int(ids.min()) >= 0 and int(ids.max()) < model.config.vocab_size


def test_module_without_config_is_told_to_pass_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        input_specs(torch.nn.Linear(2, 2))
