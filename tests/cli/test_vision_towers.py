"""Vision towers of Qwen2-VL style (flattened patches plus an image grid): example inputs from
their config, capture specialised to the grid, upcycle through the CLI, sparsify.load compared
with the dense model (at the example grid and at another), and an ONNX export that takes the
patches only and records the grid it holds."""

import json

import numpy as np
import onnx
import pytest
import torch
import transformers

import sparsify
from sparsify.capture import capture
from sparsify.inputs import example_inputs_for, input_specs
from sparsify.verify import main_output
from tests.coverage.tiny import tiny_config

# Qwen2.5-VL: window attention (windows cut from the grid); GLM-4V: full attention and a merger
TOWERS = {"qwen2_5_vl_vision": "Qwen2_5_VisionTransformerPretrainedModel", "glm4v_vision": "Glm4vVisionModel"}


def _tower(model_type):
    class_name = TOWERS[model_type]
    torch.manual_seed(0)
    return getattr(transformers, class_name)(tiny_config(model_type, [class_name])).eval()


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs)).float()


def _rel(got, ref):
    assert got.shape == ref.shape
    return float((got - ref).abs().max() / ref.abs().max())


def test_example_inputs_are_patches_and_a_grid():
    model = _tower("qwen2_5_vl_vision")
    config = model.config
    specs = {s.name: s for s in input_specs(model, batch=3)}
    assert list(specs) == ["hidden_states", "grid_thw"]
    side = 2 * config.spatial_merge_size
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    assert specs["hidden_states"].shape == (3 * side * side, width)
    assert specs["grid_thw"].static_values and not specs["hidden_states"].static_values
    inputs = example_inputs_for(model, batch=3)
    assert inputs["grid_thw"].tolist() == [[1, side, side]] * 3
    assert _out(model, inputs).abs().max() > 0  # the tower runs on them


def test_capture_is_specialised_and_leaves_torch_as_it_was():
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    model = _tower("qwen2_5_vl_vision")
    before = (fake_tensor.FakeTensorMode.may_turn_const, proxy_tensor.CONSTANT_NUMEL_LIMIT)
    captured = capture(model)
    assert (fake_tensor.FakeTensorMode.may_turn_const, proxy_tensor.CONSTANT_NUMEL_LIMIT) == before
    assert not model._forward_pre_hooks
    # the grid is no input of the graph (a constant of it); the patches and every weight are
    from torch.export.graph_signature import InputKind, TensorArgument

    tensors = [s.arg.name for s in captured.program.graph_signature.input_specs
               if s.kind == InputKind.USER_INPUT and isinstance(s.arg, TensorArgument)]
    assert tensors == ["hidden_states"]
    names = {captured.param_name(n) for n in captured.graph.nodes if n.op == "placeholder"} - {None}
    assert "blocks.0.mlp.up_proj.weight" in names


@pytest.mark.parametrize("model_type", list(TOWERS))
def test_upcycle_and_load_match_the_dense_tower(tmp_path, sparsify_cli, model_type):
    dense = _tower(model_type)
    dense.save_pretrained(tmp_path / "dense")
    code, out, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "-o", tmp_path / "moe")
    assert code == 0, err
    moe = sparsify.load(tmp_path / "moe")
    assert type(moe).__name__ == type(dense).__name__
    inputs = example_inputs_for(dense, batch=2)
    assert _rel(_out(moe, inputs), _out(dense, inputs)) <= 1e-5
    # the upcycled tower runs eagerly at any grid, not only the one it was captured at
    merge = dense.config.spatial_merge_size
    grid = torch.tensor([[1, 4 * merge, 2 * merge]])
    width = inputs["hidden_states"].shape[1]
    other = {"hidden_states": torch.randn(int(grid.prod()), width, generator=torch.Generator().manual_seed(1)),
             "grid_thw": grid}
    assert _rel(_out(moe, other), _out(dense, other)) <= 1e-5


def test_onnx_export_is_static_and_records_its_grid(tmp_path, sparsify_cli):
    import onnxruntime as ort

    _tower("qwen2_5_vl_vision").save_pretrained(tmp_path / "dense")
    assert sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "-o", tmp_path / "moe")[0] == 0
    code, _, err = sparsify_cli("export", tmp_path / "moe", "--onnx", "-o", tmp_path / "d.onnx")
    assert code != 0 and "grid_thw" in err and "--static" in err and not (tmp_path / "d.onnx").exists()

    code, out, err = sparsify_cli("export", tmp_path / "moe", "--onnx", "--static", "--batch", "3",
                                  "-o", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    moe = sparsify.load(tmp_path / "moe")
    inputs = example_inputs_for(moe, batch=3, seed=2)
    grid = inputs["grid_thw"].tolist()
    doc = json.loads(out)
    assert doc["graphs"][0]["inputs"] == ["hidden_states"] and doc["graphs"][0]["fixed_inputs"] == {"grid_thw": grid}
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert any(json.loads(v).get("fixed_inputs") == {"grid_thw": grid} for v in meta.values() if v.startswith("{"))

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["hidden_states"]
    got = torch.from_numpy(np.asarray(sess.run(None, {"hidden_states": inputs["hidden_states"].numpy()})[0]))
    assert _rel(got.float(), _out(moe, inputs)) <= 1e-4


# towers whose patch embedding reads rows of another layout than flat: Kimi K2.5 hands them to its
# Conv2d as they are ([patches, 3, patch, patch]), Inkling 2 reads a merged token's patches as an
# image, channels last ([tokens, m * patch, m * patch, channels]), its grid counting tokens
LAYOUTS = {"kimi_k25_vision": "Kimi_K25VisionModel", "inkling2_vision": "Inkling2VisionModel"}


def _layout_tower(model_type):
    torch.manual_seed(0)
    class_name = LAYOUTS[model_type]
    return getattr(transformers, class_name)(tiny_config(model_type, [class_name])).eval()


def _flat(inputs):
    main = next(iter(inputs))
    return {**inputs, main: inputs[main].reshape(inputs[main].shape[0], -1)}


@pytest.mark.parametrize("model_type", list(LAYOUTS))
def test_patches_are_shaped_as_the_patch_embedding_reads_them(model_type):
    model = _layout_tower(model_type)
    config = model.config
    patch, merge = config.patch_size, getattr(config, "spatial_merge_size", None) or 1
    specs = input_specs(model, batch=3)
    side = 2 * merge
    main, grid = specs[0], specs[1]
    assert main.name == "pixel_values" and grid.static_values and grid.fill == (1, side, side)
    if model_type == "kimi_k25_vision":  # its convolution's input window
        assert main.shape == (3 * side * side, *model.patch_embed.proj.weight.shape[1:])
    else:  # a merged token's patches, channels last, from the Linear over one patch
        channels = model.embeddings.patch_embedding.in_features // patch ** 2
        assert main.shape == (3 * side * side, merge * patch, merge * patch, channels)
    inputs = example_inputs_for(model, batch=3)
    assert _out(model, inputs).abs().max() > 0  # the tower runs on them
    with pytest.raises(RuntimeError):  # and not on the flat rows of the other towers
        _out(model, _flat(inputs))


@pytest.mark.parametrize("model_type", list(LAYOUTS))
def test_upcycle_load_and_onnx_of_a_tower_of_another_layout(tmp_path, sparsify_cli, model_type):
    import onnxruntime as ort

    dense = _layout_tower(model_type)
    dense.save_pretrained(tmp_path / "dense")
    assert sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "-o", tmp_path / "moe")[0] == 0
    moe = sparsify.load(tmp_path / "moe")  # built on the meta device and captured there: the same layout
    inputs = example_inputs_for(moe, batch=2)
    assert _rel(_out(moe, inputs), _out(dense, inputs)) <= 1e-5
    code, _, err = sparsify_cli("export", tmp_path / "moe", "--onnx", "--static", "--batch", "2",
                                  "-o", tmp_path / "m.onnx")
    assert code == 0, err
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    got = torch.from_numpy(np.asarray(sess.run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]))
    assert _rel(got.float(), _out(moe, inputs)) <= 1e-4
