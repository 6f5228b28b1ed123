"""Capture: torch.export of real and meta-device models, with fake weights.

The families below broke capture of a meta-device skeleton before weights were faked: forward
computes position tables or masks on the CPU from buffers (meta and cpu mixed), branches on the
values of its inputs (data-dependent guards), or needs inputs beyond token ids (an attention
mask, mel features). Each now captures from its skeleton, to the same graph as the real model."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import transformers

import sparsify
from sparsify.capture import capture, example_inputs_for
from sparsify.errors import CaptureError
from sparsify.io.skeleton import build_skeleton
from sparsify.verify import compare
from tests.conftest import DEMO_NAMES
from tests.coverage.registry import family
from tests.coverage.tiny import tiny_config

# family: what broke its capture from a skeleton
FAMILIES = {
    "marian": "sinusoidal positions computed on the CPU next to meta weights",
    "pegasus": "sinusoidal positions computed on the CPU next to meta weights",
    "mbart": "positions computed on the CPU next to meta weights",
    "m2m_100": "sinusoidal positions computed on the CPU next to meta weights",
    "mvp": "positions computed on the CPU next to meta weights",
    "xglm": "sinusoidal positions computed on the CPU next to meta weights",
    "codegen": "rotary table computed on the CPU next to meta weights",
    "gpt_neo": "masks computed on the CPU next to meta weights",
    "fsmt": "branches on the values of its input ids (data-dependent guard)",
    "led": "branches on the values of its attention mask (data-dependent guard)",
    "longt5": "needs an attention mask ('NoneType' object has no attribute 'shape')",
    "whisper": "needs input_features ('NoneType' object has no attribute 'shape')",
}
# the families of FAMILIES whose FFN this branch converts (the others write their FFN inline in the layer)
UPCYCLED = ["codegen", "gpt_neo", "longt5"]


def _config(model_type: str):
    return tiny_config(model_type, [family(model_type).class_name])


def _ops(captured) -> list[tuple[str, str]]:
    """The graph as (op, owning module) in order: what discovery reads."""
    out = []
    for n in captured.graph.nodes:
        if n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            out.append((str(n.target), list(stack.values())[-1][0] if stack else ""))
    return out


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_capture_demo_models(demo, name):
    model = demo(name)
    captured = capture(model)
    ops = [n for n in captured.graph.nodes if n.op == "call_function"]
    assert ops, "the graph has operations"
    assert all("nn_module_stack" in n.meta for n in ops if n.target is torch.ops.aten.linear.default)
    if model.config.is_encoder_decoder:
        assert "decoder_input_ids" in captured.kwargs


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_skeleton_captures_the_real_models_graph(model_type):
    config = _config(model_type)
    cls = getattr(transformers, family(model_type).class_name)
    skeleton = capture(build_skeleton(config, cls))
    torch.manual_seed(0)
    real = capture(cls(config))
    assert _ops(skeleton) == _ops(real)
    assert any(op == "aten.linear.default" for op, _ in _ops(skeleton))


@pytest.mark.parametrize("model_type", UPCYCLED)
@pytest.mark.parametrize("routing", [[], ["--top-k", "1", "--every", "1"]], ids=["top2-every2", "top1-every1"])
def test_upcycled_checkpoint_loads_to_the_dense_outputs(model_type, routing, tmp_path, sparsify_cli):
    config = _config(model_type)
    torch.manual_seed(0)
    dense = getattr(transformers, family(model_type).class_name)(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", *routing, "-o", tmp_path / "moe")
    assert code == 0, err
    c = compare(dense, sparsify.load(tmp_path / "moe"))
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)


def test_data_dependent_capture_writes_nothing(capfd):
    capture(build_skeleton(_config("fsmt")))
    out, err = capfd.readouterr()
    assert "def forward" not in err + out  # torch.export prints the partial graph of a failed trace


def test_capture_leaves_the_model_as_it_was():
    model = build_skeleton(_config("marian")).train()
    before = {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    capture(model)
    assert model.training
    assert {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()} == before
    assert all(type(p) is nn.Parameter and p.device.type == "meta" for p in model.parameters())


def test_capture_plain_module_with_example_inputs():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    captured = capture(net, example_inputs=(torch.randn(3, 8),))
    names = {captured.param_name(n) for n in captured.graph.nodes if n.op == "placeholder"}
    assert {"0.weight", "2.weight"} <= names


def test_capture_on_meta_device_costs_no_weights(demo):
    from sparsify.io.demo import DEMOS

    config = DEMOS["llama"]()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    captured = capture(model)
    assert captured.program is not None
    # the weights are faked; the inputs stay real, on the CPU
    assert example_inputs_for(model)["input_ids"].device.type == "cpu"


_FULL_SIZE = r"""
import resource, sys, torch, transformers
from sparsify.capture import capture
from sparsify.io.skeleton import build_skeleton
# wide and shallow: the weights of a large model, the capture time of a small one (and few
# positions: Marian computes its sinusoidal table in a Python loop over positions x width)
sizes = dict(d_model=2048, encoder_ffn_dim=8192, decoder_ffn_dim=8192, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=16, decoder_attention_heads=16, pad_token_id=1, decoder_start_token_id=1,
             max_position_embeddings=64)
config = {
    "marian": lambda: transformers.MarianConfig(vocab_size=80000, architectures=["MarianMTModel"], **sizes),
    "fsmt": lambda: transformers.FSMTConfig(src_vocab_size=40000, tgt_vocab_size=40000, langs=["en", "de"],
                                            architectures=["FSMTForConditionalGeneration"], **sizes),
}[sys.argv[1]]()
model = build_skeleton(config)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
capture(model)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(weights, grown)
"""


@pytest.mark.parametrize("model_type", ["marian", "fsmt"])
def test_full_size_capture_allocates_no_weights(model_type):
    """Marian (positions computed on the CPU) and FSMT (captured a second time, propagating the
    inputs' values) with 1.5 GB or more of float32 weights capture in a process whose peak
    memory grows by a small fraction of that."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", _FULL_SIZE, model_type], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    weights, grown = map(int, out.stdout.split())
    assert weights > 1.5e9
    assert grown < 0.15 * weights, (weights, grown)


def test_module_without_config_needs_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(nn.Linear(2, 2))
