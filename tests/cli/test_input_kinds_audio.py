"""Speech and audio checkpoints whose inputs the config alone does not lay out, through the CLI
with no argument about their inputs (`upcycle`, `verify`, `export --onnx`), and the rules that
make those inputs:

- raw audio as [batch, channels, samples] for a model that hands input_values to its first
  convolution as they are (OmniASR's audio tower; DAC), [batch, samples] for one that adds the
  channel axis itself (wav2vec2);
- mel features frames-first, [batch, frames, mel bins], for encoders where no convolution reads
  the bins as channels (Parakeet, Nemotron 3.5's audio encoder), as many frames as their
  subsampling turns into the sequence;
- frames as wide as the first Linear the forward reaches is sized for, where the config does not
  say (Granite Speech 5's stacked frames, 4 x the bins; Gemma 4's audio tower, no bins configured);
- whole chunks of 2 x n_window frames, bins first, for an encoder that cuts its features into
  chunks (Qwen3-ASR's);
- an all-valid input_features_mask where forward takes one (Audio Flamingo 3's encoder);
- an audio decoder's latents, [batch, channels its first convolution reads, frames] (Mimi's,
  Pocket TTS's), and a declared main input that forward names otherwise, under forward's name
  (VibeVoice's tokenizer halves: raw audio to the encoder, latents to the decoder);
- inputs_embeds, [batch, seq, hidden], where they are the declared main input;
- raw audio of seq whole tokens where the config says how many samples one token reads;
- use_cache=False only where forward takes it, sample=False where it samples by default;
- the main output is the first floating-point one (a codec's audio, not its integer codes).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsify.inputs import example_inputs_for, fixed_options, input_specs
from sparsify.verify import main_output
from tests.cli.round_trip import graph_inputs, onnx_rel, upcycle_verify_export
from tests.coverage.tiny import tiny_config

# id: (model_type, class, ONNX graph inputs of the single graph)
CASES = {
    "omniasr-audio": ("omniasr_audio", "OmniASRAudioModel", ["input_values"]),
    "parakeet-encoder": ("parakeet_encoder", "ParakeetEncoder", ["input_features"]),
    "nemotron3_5-audio": ("nemotron3_5_transcribe_asr_audio", "Nemotron3_5TranscribeAsrAudioModel", ["input_features"]),
    # frames as wide as its first Linear reads: 4 x the mel bins (each with its delta, two stacked)
    "granite-speech5-encoder": ("granite_speech5_encoder", "GraniteSpeech5Encoder", ["input_features"]),
    "audioflamingo3-encoder": ("audioflamingo3_encoder", "AudioFlamingo3Encoder",
                               ["input_features", "input_features_mask"]),
    # an audio decoder's latents, as many channels as its first convolution reads
    "pocket-tts-decoder": ("pocket_tts_audio_tokenizer_decoder", "PocketTTSAudioTokenizerDecoderModel", ["latents"]),
    # a head fed another model's states
    "nemotron3_5-word-timestamp": ("nemotron3_5_transcribe_word_timestamp", "Nemotron3_5TranscribeWordTimestampModel",
                                   ["inputs_embeds"]),
}


def _tiny(model_type: str, cls: str):
    torch.manual_seed(0)
    return getattr(transformers, cls)(tiny_config(model_type, [cls])).eval()


def _meta(model_type: str, cls: str):
    with torch.device("meta"):
        return getattr(transformers, cls)(tiny_config(model_type, [cls]))


@pytest.mark.parametrize("case", list(CASES))
def test_upcycle_verify_export_without_input_arguments(case, tmp_path, sparsify_cli):
    model_type, cls, names = CASES[case]
    dense = _tiny(model_type, cls)
    dense.save_pretrained(tmp_path / "dense", save_original_format=False)
    moe, out = upcycle_verify_export(sparsify_cli, dense, tmp_path)
    assert graph_inputs(moe, out) == names
    assert onnx_rel(moe, out, example_inputs_for(moe, batch=3, seq=11, seed=1)) < 1e-4  # another batch and length


def test_raw_audio_channels_follow_the_first_convolution():
    """A model that convolves input_values as they are reads [batch, 1, samples] (DAC; OmniASR,
    whose feature encoder is wav2vec2's); wav2vec2, which adds the channel axis itself, keeps
    [batch, samples]: on real weights and on the meta device (a skeleton's capture)."""
    for make in (_tiny, _meta):
        assert [s.shape for s in input_specs(make("dac", "DacModel"), batch=2)] == [(2, 1, 16000)]
        (omni,) = input_specs(make("omniasr_audio", "OmniASRAudioModel"), batch=2, seq=16)
        (w2v,) = input_specs(make("wav2vec2", "Wav2Vec2Model"), batch=2, seq=16)
        assert omni.shape == (2, 1, w2v.shape[1]) and omni.dynamic == (0, 2)
        assert len(w2v.shape) == 2 and w2v.dynamic == (0, 1)
    dac = _tiny("dac", "DacModel")
    with torch.no_grad():  # the codec runs on what was made
        assert torch.isfinite(main_output(dac(**example_inputs_for(dac)))).all()


def test_mel_layout_follows_the_convolution_that_reads_the_bins():
    whisper = _meta("whisper", "WhisperModel")
    mel = whisper.config.num_mel_bins
    assert input_specs(whisper, batch=2, seq=8)[0].shape[:2] == (2, mel)  # channels first, as before
    parakeet = _meta("parakeet_encoder", "ParakeetEncoder")
    (spec,) = input_specs(parakeet, batch=2, seq=8)
    assert spec.shape == (2, 8 * parakeet.config.subsampling_factor, parakeet.config.num_mel_bins)
    assert spec.dynamic == (0, 1)
    # frames stacked by the feature extractor: the config's input_size wide (Fun-ASR)
    fun = _tiny("fun_asr_nano_encoder", "FunAsrNanoEncoder")
    features, mask = input_specs(fun, batch=2, seq=8)
    assert features.shape[2] == fun.config.input_size == fun.config.num_mel_bins * fun.config.num_stacked_frames
    assert mask.shape == features.shape[:2]
    with torch.no_grad():
        assert torch.isfinite(main_output(fun(**example_inputs_for(fun, batch=2, seq=8)))).all()


def test_frame_width_follows_the_first_linear():
    """No config field gives the width of a frame: the first Linear the forward reaches does, on
    real weights and on the meta device."""
    for make in (_tiny, _meta):
        granite = make("granite_speech5_encoder", "GraniteSpeech5Encoder")
        (spec,) = input_specs(granite, batch=2, seq=8)
        assert spec.shape[0] == 2 and spec.shape[2] == 4 * granite.config.num_mel_bins == granite.input_linear.in_features
        assert spec.dynamic == (0, 1)
        gemma = make("gemma4_audio", "Gemma4AudioModel")
        (spec,) = input_specs(gemma, batch=2, seq=8)
        # two stride-2 convolutions over [frames, bins], then a Linear over (bins / 4) x their channels
        assert spec.shape == (2, 32, 4 * gemma.subsample_conv_projection.input_proj_linear.in_features
                              // gemma.config.subsampling_conv_channels[1])
    for model in (_tiny("granite_speech5_encoder", "GraniteSpeech5Encoder"), _tiny("gemma4_audio", "Gemma4AudioModel")):
        with torch.no_grad():
            out = main_output(model(**example_inputs_for(model, batch=2, seq=8)))
        assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_features_in_whole_chunks():
    """Qwen3-ASR's encoder cuts [batch, bins, frames] into chunks of 2 x n_window frames."""
    model = _tiny("qwen3_asr_encoder", "Qwen3ASREncoder")
    features, mask = input_specs(model, batch=2, seq=8)
    chunk = 2 * model.config.n_window
    assert features.shape[:2] == (2, model.config.num_mel_bins) and features.shape[2] % chunk == 0
    assert mask.shape == (2, features.shape[2])
    (longer, _) = input_specs(model, batch=2, seq=40)  # 40 positions need more than one chunk's 13
    assert longer.shape[2] > features.shape[2] and longer.shape[2] % chunk == 0
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**example_inputs_for(model, batch=2, seq=8)))).all()


def test_frame_mask_beside_features():
    encoder = _tiny("audioflamingo3_encoder", "AudioFlamingo3Encoder")
    features, mask = input_specs(encoder, batch=2, seq=8)
    assert mask.name == "input_features_mask" and mask.shape == (2, features.shape[2]) and mask.dtype == torch.long
    inputs = example_inputs_for(encoder, batch=2, seq=8)
    assert bool((inputs["input_features_mask"] == 1).all())
    with torch.no_grad():
        assert torch.isfinite(main_output(encoder(**inputs))).all()


def test_fixed_options_follow_the_forward():
    # forward names use_cache
    assert fixed_options(_meta("llama", "LlamaModel")) == {"use_cache": False}
    # typed **kwargs that do not declare use_cache: not passed (Mimi's encoder passes its own)
    mimi = _tiny("mimi_encoder", "MimiEncoderModel")
    assert fixed_options(mimi) == {}
    with torch.no_grad():
        mimi(**example_inputs_for(mimi, batch=2))
    assert fixed_options(_meta("bert", "BertForMaskedLM")) == {}
    # untyped **kwargs: may take it
    assert fixed_options(_meta("roformer", "RoFormerForMaskedLM")) == {"use_cache": False}
    # a sigma-VAE that samples unless told: two calls agree only with sample=False
    vibe = _tiny("vibevoice_acoustic_tokenizer", "VibeVoiceAcousticTokenizerModel")
    assert fixed_options(vibe) == {"sample": False}
    inputs = example_inputs_for(vibe, batch=1)
    with torch.no_grad():
        assert torch.equal(main_output(vibe(**inputs)), main_output(vibe(**inputs)))
        drawn = {k: v for k, v in inputs.items() if k != "sample"}
        assert not torch.equal(main_output(vibe(**drawn)), main_output(vibe(**drawn)))


def test_main_output_is_the_first_floating_output():
    codes = torch.zeros(2, 4, 3, dtype=torch.long)
    audio = torch.randn(2, 1, 16)
    out = transformers.modeling_outputs.ModelOutput(audio_codes=codes, audio_values=audio)
    assert main_output(out) is audio
    assert main_output((codes,)) is codes  # no floating output: the first tensor
    mimi = _tiny("mimi", "MimiModel")
    with torch.no_grad():
        got = mimi(**example_inputs_for(mimi, batch=2))
    assert main_output(got) is got.audio_values


def test_main_input_under_the_forwards_name():
    """VibeVoice's encoder and decoder declare input_values and take `hidden_states`: raw audio
    for the encoder; latents for the decoder, whose first convolution reads more channels than
    the audio has."""
    encoder = _tiny("vibevoice_acoustic_tokenizer_encoder", "VibeVoiceAcousticTokenizerEncoderModel")
    decoder = _tiny("vibevoice_acoustic_tokenizer_decoder", "VibeVoiceAcousticTokenizerDecoderModel")
    (audio,) = input_specs(encoder, batch=2, seq=8)
    assert audio.name == "hidden_states" and audio.shape == (2, encoder.config.channels, 16000)
    (latents,) = input_specs(decoder, batch=2, seq=8)
    assert latents.name == "hidden_states" and latents.shape == (2, decoder.config.hidden_size, 8)
    with torch.no_grad():
        for model in (encoder, decoder):
            assert torch.isfinite(main_output(model(**example_inputs_for(model, batch=2, seq=8)))).all()
    mimi = _meta("mimi_decoder", "MimiDecoderModel")
    assert [(s.name, s.shape) for s in input_specs(mimi, batch=2, seq=8)] == [("latents", (2, mimi.config.hidden_size, 8))]


def test_raw_audio_of_whole_tokens():
    """An encoder that reads samples_per_token samples a token (Muse Spark) gets seq tokens' worth."""
    model = _tiny("muse_spark_audio", "MuseSparkAudioModel")
    (spec,) = input_specs(model, batch=2, seq=3)
    assert spec.shape == (2, 3 * model.config.samples_per_token)
    with torch.no_grad():
        out = main_output(model(**example_inputs_for(model, batch=2, seq=3)))
    assert out.shape[:2] == (2, 3)


def test_an_unknown_main_input_is_named():
    """Gemma 3n's audio encoder reads audio_mel (with a padding mask whose polarity no signature
    says): one line naming the input and what to pass, not inputs of another kind."""
    from sparsify.errors import CaptureError

    with pytest.raises(CaptureError, match="main input audio_mel .*pass example_inputs"):
        input_specs(_meta("gemma3n_audio", "Gemma3nAudioEncoder"))
