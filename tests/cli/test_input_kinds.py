"""Vision and speech checkpoints through the CLI with no argument about their inputs: `upcycle`,
`verify` and `export --onnx` make pixel values, mel features or raw audio from the config, and
the ONNX graphs take inputs named as the model's forward names them.

The checkpoints are saved with the module's own tensor names (`save_original_format=False`):
transformers saves ViT, CLIP and AST under legacy names that this branch's reader does not map."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsify.inputs import example_inputs_for
from tests.cli.round_trip import graph_inputs, onnx_rel, upcycle_verify_export
from tests.coverage.tiny import tiny_config

# id: (model_type, class, config overrides, ONNX graph inputs by role)
CASES = {
    "vit": ("vit", "ViTForImageClassification", {}, {"model": ["pixel_values"]}),
    # with CLIP's own activation, quick_gelu (x * sigmoid(1.702 x))
    "clip-vision": ("clip_vision_model", "CLIPVisionModel", {}, {"model": ["pixel_values"]}),
    "clip-text": ("clip_text_model", "CLIPTextModel", {}, {"model": ["input_ids", "attention_mask"]}),
    "wav2vec2": ("wav2vec2", "Wav2Vec2ForCTC", {}, {"model": ["input_values"]}),
    "ast": ("audio-spectrogram-transformer", "ASTForAudioClassification", {}, {"model": ["input_values"]}),
    # time series: past values (and, for the encoder-decoder kind, time features and the observed
    # mask), exported as one graph since their decoder makes its own inputs
    # a masked autoencoder: seeded masking noise beside the pixels, also an input of the graph
    "vit-mae": ("vit_mae", "ViTMAEModel", {}, {"model": ["pixel_values", "noise"]}),
    # video as pixel_values_videos
    "vjepa2": ("vjepa2", "VJEPA2Model", {}, {"model": ["pixel_values_videos"]}),
    "videoprism": ("videoprism_vision_model", "VideoPrismVisionModel", {}, {"model": ["pixel_values_videos"]}),
    "patchtst": ("patchtst", "PatchTSTModel", {}, {"model": ["past_values"]}),
    "patchtsmixer": ("patchtsmixer", "PatchTSMixerModel", {}, {"model": ["past_values"]}),
    "timesfm2_5": ("timesfm2_5", "TimesFm2_5Model", {}, {"model": ["past_values"]}),
    "time-series-transformer": ("time_series_transformer", "TimeSeriesTransformerModel", {},
                                {"model": ["past_values", "past_time_features", "past_observed_mask"]}),
}


def _saved(case: str, path):
    model_type, cls, overrides, _ = CASES.get(case, (case, None, {}, None))
    cls = cls or "WhisperForConditionalGeneration"
    config = tiny_config(model_type, [cls])
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    model.save_pretrained(path, save_original_format=False)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_upcycle_verify_export_without_input_arguments(case, tmp_path, sparsify_cli):
    dense = _saved(case, tmp_path / "dense")
    moe, out = upcycle_verify_export(sparsify_cli, dense, tmp_path, experts=8)
    for role, names in CASES[case][3].items():
        assert graph_inputs(moe, out, role) == names
    # another batch size (and, for raw audio and tokens, another length) than the export traced
    assert onnx_rel(moe, out, example_inputs_for(moe, batch=3, seq=11, seed=1)) < 1e-4


def test_whisper_verifies_and_exports_with_mel_features(tmp_path, sparsify_cli):
    """Whisper's FFN is inline (not converted on this branch); its dense checkpoint still verifies
    and exports with input_features of the configured mel bins and frames."""
    dense = _saved("whisper", tmp_path / "dense")
    code, stdout, _ = sparsify_cli("verify", tmp_path / "dense", tmp_path / "dense")
    assert code == 0 and "match" in stdout
    out = tmp_path / "whisper.onnx"
    code, _, err = sparsify_cli("export", tmp_path / "dense", "--onnx", "-o", out)
    assert code == 0, err
    assert graph_inputs(dense, out, "encoder") == ["input_features"]
    assert graph_inputs(dense, out, "decoder") == ["decoder_input_ids", "encoder_hidden_states"]
    assert onnx_rel(dense, out, example_inputs_for(dense, batch=3, seq=5, seed=1)) < 1e-4
