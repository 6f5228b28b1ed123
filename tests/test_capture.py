import torch
import torch.nn as nn

from sparsify.capture import capture, example_inputs_for
from tests.conftest import DEMO_NAMES
import pytest


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_capture_demo_models(demo, name):
    model = demo(name)
    captured = capture(model)
    ops = [n for n in captured.graph.nodes if n.op == "call_function"]
    assert ops, "the graph has operations"
    assert all("nn_module_stack" in n.meta for n in ops if n.target is torch.ops.aten.linear.default)
    if model.config.is_encoder_decoder:
        assert "decoder_input_ids" in captured.kwargs


def test_capture_plain_module_with_example_inputs():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    captured = capture(net, example_inputs=(torch.randn(3, 8),))
    names = {captured.param_name(n) for n in captured.graph.nodes if n.op == "placeholder"}
    assert {"0.weight", "2.weight"} <= names


def test_capture_on_meta_device_costs_no_weights(demo):
    from sparsify.io.demo import DEMOS
    import transformers

    config = DEMOS["llama"]()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    captured = capture(model)
    assert captured.program is not None
    assert example_inputs_for(model)["input_ids"].device.type == "meta"


def test_module_without_config_needs_example_inputs():
    from sparsify.errors import CaptureError

    with pytest.raises(CaptureError, match="example_inputs"):
        capture(nn.Linear(2, 2))
