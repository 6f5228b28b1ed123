"""fuse-moe-ort: every supported MoE layer becomes one com.microsoft.MoE node that computes what
the standard ops computed; unsupported layers stay, with the reason; layouts are checked."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from sparsify.moe import MoEConfig
from sparsify.passes.onnx import FuseMoEOrt, moe_layout_problem
from tests.onnx.helpers import graph_of, random_moe, rel, run

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


def _inputs():
    return {"x": torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))}


@pytest.mark.parametrize("config,form,activation,bias", FUSED,
                         ids=["relu-bias", "gelu-tanh", "silu-raw", "switch", "swiglu", "swiglu-bias-k3"])
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


@pytest.mark.parametrize("config,form,activation,bias,why", LEFT,
                         ids=["erf-gelu", "gated-gelu", "capacity", "expert-choice", "float64-router"])
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
