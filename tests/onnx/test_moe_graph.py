"""The standard-ops MoE computes what SparseMoE computes, for every router kind and FFN form.

Built two ways: recorded directly on an onnx-ir graph (as ONNX-native upcycling does) and
through torch.onnx export of the custom op (as `sparsify export` does). Run in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from sparsify.moe import MoEConfig
from sparsify.onnx.export import capture_onnx, lower_onnx
from tests.onnx.helpers import graph_of, random_moe, rel, run

CASES = [
    (MoEConfig(4, 2), "dense", "relu", True),
    (MoEConfig(4, 2, normalize=False), "gated", "silu", False),
    (MoEConfig(4, 1, router="switch"), "dense", "gelu", True),
    (MoEConfig(4, 2, capacity_factor=0.75), "gated", "gelu_tanh", True),
    (MoEConfig(4, 2, router="expert-choice", capacity_factor=0.5), "dense", "quick_gelu", False),
    (MoEConfig(4, 2, router_dtype="float64"), "dense", "mish", False),
]
IDS = ["topk-relu", "raw-swiglu", "switch-gelu", "capacity", "expert-choice", "float64-router"]


@pytest.mark.parametrize("config,form,activation,bias", CASES, ids=IDS)
def test_built_graph_matches_sparse_moe(config, form, activation, bias):
    moe = random_moe(config, form, activation, bias)
    model = graph_of(moe)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for shape in [(3, 5, 16), (1, 23, 16)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            ref = moe(x).numpy()
        assert rel(run(model, {"x": x}), ref) < 1e-5


def test_capacity_drops_tokens():
    """The capacity case must exercise dropping: with a large capacity the output changes."""
    moe = random_moe(MoEConfig(4, 2, capacity_factor=0.75), "gated", "gelu_tanh", True)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(5))
    dropped = run(graph_of(moe), {"x": x})
    moe.router.config.capacity_factor = 100.0
    assert rel(run(graph_of(moe), {"x": x}), dropped) > 1e-2


class _Layer(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states):
        return self.moe(hidden_states)


@pytest.mark.parametrize("config,form,activation,bias", [CASES[1], CASES[3], CASES[4]], ids=[IDS[1], IDS[3], IDS[4]])
def test_exported_layer_matches_sparse_moe_at_other_shapes(config, form, activation, bias):
    layer = _Layer(random_moe(config, form, activation, bias)).eval()
    d = torch.export.Dim.DYNAMIC
    model = capture_onnx(layer, {"hidden_states": torch.randn(2, 8, 16)}, {"hidden_states": {0: d, 1: d}})
    lower_onnx(model, "standard")
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    x = torch.randn(3, 13, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer(x).numpy()
    assert rel(run(model, {"hidden_states": x}), ref) < 1e-5
    assert np.isfinite(ref).all()


def test_stand_in_runs_eagerly_and_is_undone():
    """During export each SparseMoE is swapped for a custom-op stand-in computing the same."""
    from sparsify.moe import SparseMoE
    from sparsify.onnx.torch_op import ExportMoE, export_friendly

    layer = _Layer(random_moe(MoEConfig(4, 2), "gated", "silu", True)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = layer(x)
        with export_friendly(layer) as paths:
            assert paths == ["moe"] and isinstance(layer.moe, ExportMoE)
            assert torch.allclose(layer(x), ref, atol=1e-6)
    assert isinstance(layer.moe, SparseMoE)
