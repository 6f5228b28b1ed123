"""Vision and document checkpoints through the CLI with no argument about their inputs: the
inputs their forward requires beyond pixels or tokens are made from the config and signature,
and `upcycle`, `verify` and `export --onnx` run on them.

Tiny real models built from configs (tests/coverage/tiny.py), saved with the module's own tensor
names, upcycled through the CLI and compared with the dense model."""

from __future__ import annotations

import pytest
import torch
import transformers

import sparsify
from sparsify.inputs import example_inputs_for, input_specs
from sparsify.verify import compare, main_output
from tests.cli.round_trip import graph_inputs, onnx_rel, upcycle_verify_export
from tests.coverage.tiny import tiny_config

# id: (model_type, class, ONNX graph inputs of the single graph)
CASES = {
    # squeeze-and-excitation blocks: 1x1 convolutions written with padding="same"
    "efficientnet": ("efficientnet", "EfficientNetForImageClassification", ["pixel_values"]),
    # token boxes: fractions of the page (BROS), integers below max_2d_position_embeddings (LiLT)
    "bros": ("bros", "BrosModel", ["input_ids", "attention_mask", "bbox"]),
    "lilt": ("lilt", "LiltModel", ["input_ids", "attention_mask", "bbox"]),
    # characters as Unicode code points: the config has no vocab_size, the tokenizer says it
    "canine": ("canine", "CanineModel", ["input_ids", "attention_mask"]),
    # Perceiver declares a generic `inputs`; its forward also takes input_ids, of a known kind
    "perceiver": ("perceiver", "PerceiverForMaskedLM", ["input_ids", "attention_mask"]),
    # X-MOD's language adapters read lang_ids: the configured default language (else the first)
    "xmod": ("xmod", "XmodForMaskedLM", ["input_ids", "attention_mask", "lang_ids"]),
    # images as sequences of patches with their grid (NaFlex); its checks on the grid export too
    "siglip2": ("siglip2_vision_model", "Siglip2VisionModel", ["pixel_values", "pixel_attention_mask", "spatial_shapes"]),
    # a prompt image and its mask beside the input, each half the configured canvas
    "seggpt": ("seggpt", "SegGptModel", ["pixel_values", "prompt_pixel_values", "prompt_masks"]),
    # detected regions beside the tokens: their features and boxes
    "lxmert": ("lxmert", "LxmertModel", ["input_ids", "attention_mask", "visual_feats", "visual_pos"]),
    # learned queries and the image encoder's states they read
    "blip-2-qformer": ("blip_2_qformer", "Blip2QFormerModel", ["query_embeds", "encoder_hidden_states"]),
    # an episode: states, actions, returns-to-go, timesteps
    "decision-transformer": ("decision_transformer", "DecisionTransformerModel",
                             ["states", "actions", "returns_to_go", "timesteps", "attention_mask"]),
    # patches packed in one row with each image's (rows, columns): the graph holds the sizes
    "minicpm-ocr-vision": ("minicpm_ocr_vision", "MiniCPMOcrVisionModel", ["pixel_values"]),
    # flattened patches with each one's (x, y)
    "gemma4-vision": ("gemma4_vision", "Gemma4VisionModel", ["pixel_values", "pixel_position_ids"]),
    # a drafter's block of noise embeddings, the target model's states and a mask over both
    "muse-glimmer-assistant": ("muse_glimmer_assistant", "MuseGlimmerAssistantModel",
                               ["noise_embeds", "context_hidden_states", "attention_mask"]),
}


def _saved(model_type: str, cls: str, path):
    config = tiny_config(model_type, [cls])
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    model.save_pretrained(path, save_original_format=False)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_upcycle_verify_export(case, tmp_path, sparsify_cli):
    model_type, cls, names = CASES[case]
    dense = _saved(model_type, cls, tmp_path / "dense")
    # CANINE fixes its sizes: its export is refused as dynamic and made static, as the error says
    moe, out = upcycle_verify_export(sparsify_cli, dense, tmp_path, static_if_refused=True)
    assert graph_inputs(moe, out) == names
    assert onnx_rel(moe, out, example_inputs_for(moe, batch=3, seq=11, seed=1)) < 1e-4


def test_efficientnet_squeeze_excitation_is_converted(tmp_path, sparsify_cli):
    """The FFNs found are the squeeze-and-excitation pairs (reduce -> swish -> expand), the only
    projection pairs of an EfficientNet."""
    _saved("efficientnet", "EfficientNetForImageClassification", tmp_path / "dense")
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "--every", "1",
                                "-o", tmp_path / "moe")
    assert code == 0, err
    moe = sparsify.load(tmp_path / "moe")
    converted = {name for name, m in moe.named_modules() if type(m).__module__.startswith("sparsify")}
    assert any(name.endswith("squeeze_excite") or ".squeeze_excite." in name for name in converted), converted


def test_boxes_are_boxes():
    """x0 <= x1 and y0 <= y1: LiLT embeds the box's width and height as indices."""
    for model_type, cls in (("lilt", "LiltModel"), ("bros", "BrosModel")):
        model = getattr(transformers, cls)(tiny_config(model_type, [cls])).eval()
        box = example_inputs_for(model, batch=3, seq=7)["bbox"]
        assert box.shape == (3, 7, 4)
        assert (box[..., 2] >= box[..., 0]).all() and (box[..., 3] >= box[..., 1]).all()
        assert box.dtype == (torch.long if model_type == "lilt" else torch.float32)
        assert int(box.max()) < 1001 if model_type == "lilt" else float(box.max()) < 1


def test_vision_and_language_model_gets_its_image():
    """ViLT takes token ids and the image its config sizes; without the image it cannot run."""
    config = tiny_config("vilt", ["ViltModel"])
    torch.manual_seed(0)
    model = transformers.ViltModel(config).eval()
    names = [s.name for s in input_specs(model, batch=2, seq=5)]
    assert names == ["input_ids", "attention_mask", "pixel_values"]
    inputs = example_inputs_for(model, batch=2, seq=5)
    assert inputs["pixel_values"].shape == (2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**inputs))).all()


def test_xmod_language_is_the_default_one():
    config = tiny_config("xmod", ["XmodModel"])
    config.languages, config.default_language = ["en_XX", "de_DE"], "de_DE"
    model = transformers.XmodModel(config).eval()
    assert example_inputs_for(model, batch=3)["lang_ids"].tolist() == [1, 1, 1]


def test_timesfm_gets_padding_and_frequency():
    """TimesFM requires past_values_padding and freq: no padding, frequency class 0."""
    config = tiny_config("timesfm", ["TimesFmModel"])
    torch.manual_seed(0)
    model = transformers.TimesFmModel(config).eval()
    inputs = example_inputs_for(model, batch=2)
    assert inputs["past_values_padding"].shape == inputs["past_values"].shape
    assert not inputs["past_values_padding"].any() and inputs["freq"].tolist() == [[0], [0]]
    with torch.no_grad():
        assert torch.isfinite(main_output(model(**inputs))).all()


def test_keypoint_matcher_gets_image_pairs():
    """EfficientLoFTR (transformers' keypoint-matching family) reads pairs of images."""
    config = tiny_config("efficientloftr", ["EfficientLoFTRModel"])
    torch.manual_seed(0)
    model = transformers.EfficientLoFTRModel(config).eval()
    (spec,) = input_specs(model, batch=2)
    assert spec.name == "pixel_values" and spec.shape[:3] == (2, 2, 3)
    with torch.no_grad():
        out = main_output(model(**example_inputs_for(model, batch=2)))
    assert out.shape[:2] == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("model_type,expected", [("bit", False), ("convnextv2", True), ("efficientnet", True)])
def test_ffn_like_chains_of_convolutional_families(model_type, expected):
    """BiT's only projection -> activation -> projection path runs from one block's output
    convolution, summed with the projected shortcut, into the next block: a residual merge, no FFN;
    ConvNeXt V2's response normalisation adds the FFN's own rescaled value back (still one FFN);
    EfficientNet's squeeze-excitation pairs are 1x1 convolutions with padding="same"."""
    from sparsify.capture import capture
    from sparsify.io.skeleton import build_skeleton
    from tests.coverage.ffn_like import has_ffn_like_chain
    from tests.coverage.registry import family

    config = tiny_config(model_type, [family(model_type).class_name])
    assert has_ffn_like_chain(capture(build_skeleton(config))) is expected


@pytest.mark.parametrize("values", [[True, True, True], [True, False, True], []])
def test_is_all_true_in_onnx_runtime(values, tmp_path):
    """aten._is_all_true (a checked condition's reduction) as ONNX: torch's answer, also for none."""
    import numpy as np
    import onnxruntime as ort

    from sparsify.onnx.torch_op import TRANSLATIONS

    class AllTrue(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten._is_all_true.default(x > 0)

    x = torch.tensor([1.0 if v else -1.0 for v in values])
    program = torch.onnx.export(AllTrue(), (x,), dynamo=True, custom_translation_table=TRANSLATIONS, verbose=False)
    program.save(str(tmp_path / "all.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "all.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert bool(np.asarray(got)) == bool(torch.ops.aten._is_all_true.default(x > 0))


def test_packed_patches_are_whole_windows():
    """MiniCPM-V's tower: batch images of 2w x 2w patches side by side in one row, so that its
    window merger (w x w) and the 2 x 2 downsampling after it divide each grid; the merger runs."""
    config = tiny_config("minicpmv4_7_vision", ["MiniCPMV4_7VisionModel"])
    torch.manual_seed(0)
    model = transformers.MiniCPMV4_7VisionModel(config).eval()
    specs = {s.name: s for s in input_specs(model, batch=3)}
    assert specs["target_sizes"].static_values and specs["pixel_values"].dynamic == ()
    inputs = example_inputs_for(model, batch=3)
    side = 2 * max(config.window_kernel_size)
    assert inputs["target_sizes"].tolist() == [[side, side]] * 3
    assert inputs["pixel_values"].shape == (1, 3, config.patch_size, 3 * side * side * config.patch_size)
    with torch.no_grad():
        out = main_output(model(**inputs))
    w = max(config.window_kernel_size)
    assert out.shape == (1, 3 * side * side // (w * w), config.hidden_size) and torch.isfinite(out).all()


def test_gemma4_patch_positions_are_a_grid():
    """Each patch's (x, y), row by row as Gemma 4's image processor lays them out; the pooler
    averages whole k x k blocks into (side / k)^2 soft tokens per image."""
    config = tiny_config("gemma4_vision", ["Gemma4VisionModel"])
    torch.manual_seed(0)
    model = transformers.Gemma4VisionModel(config).eval()
    inputs = example_inputs_for(model, batch=2)
    k = config.pooling_kernel_size
    side = 2 * k
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).reshape(side * side, 2)
    assert torch.equal(inputs["pixel_position_ids"], grid.expand(2, -1, -1))
    assert inputs["pixel_values"].shape == (2, side * side, 3 * config.patch_size ** 2)
    with torch.no_grad():
        out = main_output(model(**inputs))
    assert out.shape == (2 * (side // k) ** 2, config.hidden_size) and torch.isfinite(out).all()


def test_drafter_mask_spans_context_and_block():
    """A DFlash drafter attends over the target's context and its own block: the mask covers both."""
    config = tiny_config("muse_glimmer_assistant", ["MuseGlimmerAssistantModel"])
    model = transformers.MuseGlimmerAssistantModel(config).eval()
    shapes = {s.name: s.shape for s in input_specs(model, batch=2, seq=5)}
    assert shapes == {"noise_embeds": (2, config.block_size, config.hidden_size),
                      "context_hidden_states": (2, 5, config.hidden_size * len(config.target_layer_ids)),
                      "attention_mask": (2, 5 + config.block_size)}


def test_distinct_lengths_get_distinct_onnx_names():
    """Dims torch keeps apart are named apart (ONNX Runtime takes one name for one size); the
    batch keeps one name."""
    import onnx_ir as ir

    from sparsify.onnx.signatures import name_io

    graph = ir.Graph(inputs=[ir.Value(name="context", shape=ir.Shape(["s0", "s1"])),
                             ir.Value(name="attention_mask", shape=ir.Shape(["s2", "s3"]))],
                     outputs=[], nodes=[])
    name_io(ir.Model(graph, ir_version=10), [])
    assert [str(d) for v in graph.inputs for d in v.shape] == ["batch", "sequence", "batch", "attention_mask_sequence"]


def test_a_forward_that_samples_is_compared_under_one_seed(tmp_path, sparsify_cli):
    """ViLT picks image patches with torch.multinomial in eval mode: two dense runs on the same
    inputs differ. `compare` and `sparsify verify` run both models under the same seed, so the
    upcycled model matches, and verify says so instead of blaming the output's weights."""
    from sparsify.inputs import example_inputs_for as inputs_for
    from sparsify.verify import seeded_output

    dense = _saved("vilt", "ViltModel", tmp_path / "dense")
    x = inputs_for(dense)
    with torch.no_grad():
        assert not torch.equal(main_output(dense(**x)), main_output(dense(**x)))  # it does sample
        assert torch.equal(seeded_output(dense, x), seeded_output(dense, x))
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "-o", tmp_path / "moe")
    assert code == 0, err
    c = compare(dense, sparsify.load(tmp_path / "moe"))
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)
    code, stdout, _ = sparsify_cli("verify", tmp_path / "dense", tmp_path / "moe")
    assert code == 0 and "match" in stdout
