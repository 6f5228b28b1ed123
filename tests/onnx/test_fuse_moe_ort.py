"""fuse-moe-ort: every supported MoE layer becomes one com.microsoft.MoE node that computes what
the standard ops computed; unsupported layers stay, with the reason; layouts are checked. Static
shapes (whose routing constant folding rewrites) fuse exactly as dynamic ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from sparsify.moe import MoEConfig
from sparsify.passes.onnx import FuseMoEOrt, moe_layout_problem
from sparsify.passes.onnx.moe_routing import is_router
from tests.onnx.helpers import as_exported, graph_of, random_moe, rel, run

FUSED = [
    (MoEConfig(4, 2), "dense", "relu", True),
    (MoEConfig(4, 2), "dense", "gelu_tanh", False),
    (MoEConfig(4, 2, normalize=False), "dense", "silu", True),
    (MoEConfig(4, 1, router="switch"), "dense", "relu", False),
    (MoEConfig(8, 2), "gated", "silu", False),
    (MoEConfig(4, 3), "gated", "silu", True),
]
LEFT = [
    (MoEConfig(4, 2), "dense", "gelu", False, "tanh approximation"),
    (MoEConfig(4, 2), "gated", "gelu_tanh", False, "gated gelu_tanh"),
    (MoEConfig(4, 2, capacity_factor=1.0), "dense", "relu", False, "capacity factor"),
    (MoEConfig(4, 2, router="expert-choice"), "dense", "relu", False, "expert-choice"),
    (MoEConfig(4, 2, router_dtype="float64"), "gated", "silu", False, "float64"),
]


def _inputs(batch: int = 3, seq: int = 7):
    return {"x": torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(3))}

# (batch, seq) of static graphs: single tokens, single sequences, and neither
STATIC = [(1, 1), (1, 6), (2, 1), (3, 7)]
FUSED_IDS = ["relu-bias", "gelu-tanh", "silu-raw", "switch", "swiglu", "swiglu-bias-k3"]
LEFT_IDS = ["erf-gelu", "gated-gelu", "capacity", "expert-choice", "float64-router"]


@pytest.mark.parametrize("config,form,activation,bias", FUSED, ids=FUSED_IDS)
def test_fuses_into_one_node_with_same_outputs(config, form, activation, bias):
    moe = random_moe(config, form, activation, bias)
    model = graph_of(moe)
    standard = run(model, _inputs())
    fuse = FuseMoEOrt()
    assert fuse(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("MoE") == 1 and "TopK" not in ops and "Softmax" not in ops, ops
    assert fuse.report.fused == ["layer"] and not fuse.report.left
    node = next(n for n in model.graph if n.op_type == "MoE")
    assert node.domain == "com.microsoft" and moe_layout_problem(node) is None
    with torch.no_grad():
        ref = moe(_inputs()["x"]).numpy()
    fused = run(model, _inputs())
    assert rel(fused, ref) < 1e-5 and rel(fused, standard) < 1e-5


@pytest.mark.parametrize("config,form,activation,bias,why", LEFT, ids=LEFT_IDS)
def test_unsupported_layers_stay_standard_with_reason(config, form, activation, bias, why):
    moe = random_moe(config, form, activation, bias)
    model = graph_of(moe)
    fuse = FuseMoEOrt()
    assert not fuse(model).modified
    assert not any(n.op_type == "MoE" for n in model.graph)
    assert list(fuse.report.left) == ["layer"] and why in fuse.report.left["layer"], fuse.report.left
    with torch.no_grad():
        ref = moe(_inputs()["x"]).numpy()
    assert rel(run(model, _inputs()), ref) < 1e-5


def test_layout_check_catches_transposed_weights():
    """ONNX Runtime accepts some wrong layouts silently; the pass's postcondition does not."""
    model = graph_of(random_moe(MoEConfig(4, 2), "dense", "relu", False))
    FuseMoEOrt()(model)
    node = next(n for n in model.graph if n.op_type == "MoE")
    fc1 = node.inputs[2]
    transposed = np.ascontiguousarray(fc1.const_value.numpy().transpose(0, 2, 1))
    wrong = ir.Value(name="fc1_t", const_value=ir.tensor(transposed))
    model.graph.register_initializer(wrong)
    node.replace_input_with(2, wrong)
    assert "fc1 has shape (4, 16, 24)" in moe_layout_problem(node)
    with pytest.raises(ir.passes.PostconditionError, match="bad MoE node"):
        FuseMoEOrt().ensures(model)


def _fused_and_checked(model: ir.Model, moe, batch: int, seq: int) -> None:
    """Fuse `model` (one layer) and check: one MoE node, nothing of the router left, and the
    outputs of torch and of the unfused graph."""
    inputs = _inputs(batch, seq)
    standard = run(model, inputs)
    fuse = FuseMoEOrt()
    assert fuse(model).modified, fuse.report.left
    ops = [n.op_type for n in model.graph]
    assert ops.count("MoE") == 1 and "TopK" not in ops and "Softmax" not in ops, ops
    assert fuse.report.fused == ["layer"] and not fuse.report.left
    with torch.no_grad():
        ref = moe(inputs["x"]).numpy()
    fused = run(model, inputs)
    assert rel(fused, ref) < 1e-5 and rel(fused, standard) < 1e-5


@pytest.mark.parametrize("batch,seq", STATIC)
@pytest.mark.parametrize("config,form,activation,bias", FUSED, ids=FUSED_IDS)
def test_static_shapes_fuse_as_dynamic_ones(config, form, activation, bias, batch, seq):
    """With static shapes constant folding turns the routing's Shape(probs) into a constant
    (as a --static export does); the layer still fuses and computes the same."""
    moe = random_moe(config, form, activation, bias)
    model = as_exported(graph_of(moe, batch, seq))
    zeros = next(n for n in model.graph if n.op_type == "ScatterElements").inputs[0]
    assert ir.convenience.get_const_tensor(zeros.producer().inputs[0]) is not None  # the folded form
    _fused_and_checked(model, moe, batch, seq)


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 7)])
def test_zeros_folded_into_an_initializer_fuse(batch, seq):
    moe = random_moe(MoEConfig(4, 2), "gated", "silu", True)
    model = as_exported(graph_of(moe, batch, seq), fold_zeros=True)
    zeros = next(n for n in model.graph if n.op_type == "ScatterElements").inputs[0]
    assert zeros.producer() is None and zeros.const_value is not None
    _fused_and_checked(model, moe, batch, seq)


@pytest.mark.parametrize("config,form,activation,bias,why", LEFT, ids=LEFT_IDS)
def test_static_shapes_leave_what_dynamic_ones_leave(config, form, activation, bias, why):
    moe = random_moe(config, form, activation, bias)
    model = as_exported(graph_of(moe, 2, 5))
    fuse = FuseMoEOrt()
    assert not fuse(model).modified
    assert list(fuse.report.left) == ["layer"] and why in fuse.report.left["layer"], fuse.report.left
    with torch.no_grad():
        ref = moe(_inputs(2, 5)["x"]).numpy()
    assert rel(run(model, _inputs(2, 5)), ref) < 1e-5


def _replace_zeros(model: ir.Model, array: np.ndarray) -> None:
    scatter = next(n for n in model.graph if n.op_type == "ScatterElements")
    value = ir.Value(name="zeros_replaced", const_value=ir.tensor(array))
    model.graph.register_initializer(value)
    scatter.replace_input_with(0, value)
    ir.passes.common.RemoveUnusedNodesPass()(model)


@pytest.mark.parametrize("case,why", [
    ("ones", "non-zero tensor"),
    ("fixed-size-in-dynamic-graph", "not of the router probabilities' shape"),
])
def test_routing_into_other_than_zeros_of_the_probabilities_shape_is_left(case, why):
    """Fusion would change what the graph computes (a non-zero base), or the graph only runs at
    one token count while the fused operator runs at any: both stay, with the reason."""
    moe = random_moe(MoEConfig(4, 2), "dense", "relu", True)
    if case == "ones":
        model = as_exported(graph_of(moe, 3, 7))
        _replace_zeros(model, np.ones((21, 4), np.float32))
    else:
        model = as_exported(graph_of(moe))
        _replace_zeros(model, np.zeros((21, 4), np.float32))
    standard = run(model, _inputs(3, 7))
    fuse = FuseMoEOrt()
    assert not fuse(model).modified
    assert why in fuse.report.left["layer"], fuse.report.left
    assert sum(is_router(n) for n in model.graph) == 1
    np.testing.assert_array_equal(run(model, _inputs(3, 7)), standard)
    if case == "ones":  # the standard ops add every expert's output once more
        with torch.no_grad():
            assert rel(standard, moe(_inputs(3, 7)["x"]).numpy()) > 1e-2
