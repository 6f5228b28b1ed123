"""ONNX-native upcycling: FFNs found in ONNX graphs (any activation spelling, MatMul or Gemm,
dense or gated) become MoE layers whose outputs equal the dense graph's (1e-5 relative)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sparsify.errors import NoFFNFoundError, OptionError, SourceError
from sparsify.onnx import upcycle_onnx
from tests.onnx.helpers import count_ops, ffn_graph, rel, run

# demo -> (site names of the first graph, activation, fused by --target ort)
DEMOS = {
    "llama": ("model.layers.{}.mlp", "silu", True),
    "gpt2": ("transformer.h.{}.mlp", "gelu_tanh", True),
    "bert": ("encoder.layer.{}", "gelu", False),
    "t5": ("encoder.block.{}.layer.1.DenseReluDense", "relu", True),
}


def feeds(role: str) -> dict:
    """Batch 3, sequence 9, with padding in the first row."""
    rng = np.random.default_rng(1)
    mask = np.ones((3, 9), dtype=np.int64)
    mask[0, -3:] = 0
    if role == "decoder":
        return {"decoder_input_ids": rng.integers(0, 512, (3, 9)), "encoder_attention_mask": mask,
                "encoder_hidden_states": rng.standard_normal((3, 9, 64)).astype(np.float32)}
    return {"input_ids": rng.integers(0, 512, (3, 9)), "attention_mask": mask}


@pytest.mark.parametrize("name", list(DEMOS))
def test_upcycled_graph_preserves_outputs(name, dense_onnx, tmp_path):
    pattern, activation, fusable = DEMOS[name]
    for role, dense in dense_onnx(name).items():
        expected = run(dense, feeds(role))
        for target in ("ort", "standard"):
            out = tmp_path / f"{role}-{target}.onnx"
            result = upcycle_onnx(dense, out, experts=4, router_init_std=0.5, target=target)
            plan = result.plan
            assert [s.index for s in plan.sites] == [0, 1, 2, 3] and len(plan.selected) == 2
            assert all(s.activation == activation for s in plan.sites)
            if role != "decoder":
                assert [s.path for s in plan.sites] == [pattern.format(i) for i in range(4)]
            proto = onnx.load(str(out))
            onnx.checker.check_model(proto)
            moe_nodes = count_ops(proto, "MoE", "com.microsoft")
            assert moe_nodes == (2 if target == "ort" and fusable else 0)
            assert count_ops(proto, "TopK") == 2 - moe_nodes
            meta = json.loads({p.key: p.value for p in proto.metadata_props}["sparsify"])
            assert meta["plan"]["selected"] == plan.selected and meta["target"] == target
            assert rel(run(out, feeds(role)), expected) < 1e-5


def test_noise_is_deterministic_and_changes_outputs(dense_onnx, tmp_path):
    dense = dense_onnx("llama")["model"]
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    upcycle_onnx(dense, a, experts=4, noise=0.02, seed=3, target="standard")
    upcycle_onnx(dense, b, experts=4, noise=0.02, seed=3, target="standard")
    weights = [{i.name: i.raw_data for i in onnx.load(str(p)).graph.initializer} for p in (a, b)]
    assert weights[0] == weights[1]
    assert rel(run(a, feeds("model")), run(dense, feeds("model"))) > 1e-4


@pytest.mark.parametrize("activation,opset,name",
                         [("erf-gelu", 18, "gelu"), ("Gelu", 20, "gelu"), ("Relu", 13, "relu")])
def test_activation_spellings_and_layers_option(activation, opset, name, tmp_path):
    src = ffn_graph(tmp_path / "ffn.onnx", activation, opset)
    x = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    result = upcycle_onnx(src, tmp_path / "moe.onnx", experts=3, top_k=1, layers=[0], target="standard")
    assert [(s.form, s.activation) for s in result.plan.sites] == [("dense", name)]
    assert count_ops(tmp_path / "moe.onnx", "TopK") == 1
    assert rel(run(tmp_path / "moe.onnx", x), run(src, x)) < 1e-5


@pytest.mark.parametrize("make,error,words", [
    (lambda p: ffn_graph(p, "Sin"), NoFFNFoundError, "activation (Sin) is not one sparsify knows"),
    (lambda p: ffn_graph(p, "Relu", leak=True), NoFFNFoundError, "also used outside the FFN"),
    (lambda p: ffn_graph(p, "Relu", opset=11), SourceError, "opset 11"),
    (lambda p: p.write_text("not a model") and p, SourceError, "is not an ONNX model"),
])
def test_bad_input_is_one_line_and_writes_nothing(make, error, words, tmp_path):
    src = make(tmp_path / "in.onnx")
    with pytest.raises(error) as info:
        upcycle_onnx(src, tmp_path / "out.onnx", experts=4, every=1)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_expert_choice_is_refused(tmp_path):
    with pytest.raises(OptionError, match="causal"):
        upcycle_onnx(ffn_graph(tmp_path / "in.onnx"), tmp_path / "out.onnx", experts=4, router="expert-choice")


def test_a_recipe_sets_each_layer_of_the_graph(dense_onnx, tmp_path):
    from sparsify import Recipe

    dense = dense_onnx("llama")["model"]
    recipe = Recipe(every=1, experts=4, model={1: {"experts": 8, "top_k": 4, "granularity": 2},
                                               3: {"experts": 2, "top_k": 1}})
    out = tmp_path / "moe.onnx"
    result = upcycle_onnx(dense, out, recipe=recipe, router_init_std=0.5, target="ort")
    assert [(result.plan.layers[p].moe.num_experts, result.plan.layers[p].moe.top_k) for p in result.plan.selected] \
        == [(4, 2), (8, 4), (4, 2), (2, 1)]
    assert Recipe(json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["sparsify"])["plan"]["recipe"]) \
        == recipe.with_options({"router_init_std": 0.5})
    assert rel(run(out, feeds("model")), run(dense, feeds("model"))) < 1e-5


def _scaled_gated_graph(path, scale: float):
    """A gated FFN written as Falcon-H1 writes its multipliers: x -> gate MatMul * s -> SiLU
    (x * Sigmoid(x)), times up MatMul * s, * s, -> down MatMul * s (an Identity on the way)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("gate.weight", (8, 16)), ("up.weight", (8, 16)), ("down.weight", (16, 8)))]
    inits.append(numpy_helper.from_array(np.array(scale, np.float32), "s"))
    nodes = [helper.make_node("MatMul", ["x", "gate.weight"], ["g0"]), helper.make_node("Mul", ["g0", "s"], ["g"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("MatMul", ["x", "up.weight"], ["u0"]), helper.make_node("Mul", ["s", "u0"], ["u"]),
             helper.make_node("Mul", ["act", "u"], ["p0"]), helper.make_node("Div", ["p0", "s"], ["p1"]),
             helper.make_node("Identity", ["p1"], ["p"]),
             helper.make_node("MatMul", ["p", "down.weight"], ["y0"]), helper.make_node("Mul", ["y0", "s"], ["y"])]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("target", ["ort", "standard"])
def test_products_by_one_are_the_identity(tmp_path, target):
    """Multipliers of 1 around and inside a gated FFN (Falcon-H1's defaults) are looked
    through, as the ATen matcher does: one gated SiLU site, and the MoE reproduces the graph."""
    src = _scaled_gated_graph(tmp_path / "ffn.onnx", 1.0)
    x = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    out = tmp_path / "moe.onnx"
    result = upcycle_onnx(src, out, experts=3, top_k=1, layers=[0], router_init_std=0.5, target=target)
    assert [(s.form, s.activation) for s in result.plan.sites] == [("gated", "silu")]
    assert rel(run(out, x), run(src, x)) < 1e-5


def test_a_product_by_another_constant_is_not_looked_through(tmp_path):
    src = _scaled_gated_graph(tmp_path / "ffn.onnx", 2.0)
    with pytest.raises(NoFFNFoundError):
        upcycle_onnx(src, tmp_path / "moe.onnx", experts=3, target="standard")
