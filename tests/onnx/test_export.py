"""`export_onnx` of upcycled demo models: checker-valid graphs that ONNX Runtime runs on CPU with
torch's outputs, for both targets, at a batch and sequence length other than the exported ones;
with --target ort every MoE layer of demo:llama and demo:t5 is one com.microsoft.MoE node. Static
exports (batch 1, sequence 1, ...) fuse exactly the layers the dynamic export fuses."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers

import sparsify
from sparsify.errors import OptionError
from sparsify.capture import example_inputs_for
from sparsify.onnx.export import TARGETS, CapturedGraph, capture_graphs, export_onnx, write_graphs
from tests.onnx.helpers import count_ops, rel, session

# (demo, MoE layers per graph, fused with --target ort)
DEMOS = {"llama": ({"model": 2}, True), "t5": ({"encoder": 2, "decoder": 2}, True),
         "gpt2": ({"model": 2}, True), "bert": ({"model": 2}, False), "qwen2": ({"model": 2}, True)}
# (demo, batch, seq) of static exports: batch 1 and sequence 1 in several families, and neither
STATIC = [("llama", 1, 128), ("t5", 1, 1), ("gpt2", 2, 1), ("bert", 1, 5), ("qwen2", 3, 4)]


@pytest.fixture(scope="module")
def upcycled():
    cache = {}

    def get(name):
        if name not in cache:
            # distinct experts and a decisive router, so that routing matters to the outputs
            cache[name] = sparsify.upcycle(f"demo:{name}", experts=4, top_k=2, noise=0.05, router_init_std=0.5)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def captured(upcycled):
    """`captured(name)` -> (model, fresh copies of its captured graphs). Capture is the slow
    step of `export_onnx`; both targets are written from one capture, as export_onnx writes."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = [(g.role, ir.to_proto(g.model), g.outputs) for g in capture_graphs(upcycled(name))]
        return upcycled(name), [CapturedGraph(r, ir.from_proto(p), o) for r, p, o in cache[name]]

    return get


def onnx_outputs(result, inputs: dict) -> np.ndarray:
    """Run the exported graph(s) on `inputs` (the encoder's output feeds the decoder)."""
    graphs = {g.role: session(g.path) for g in result.graphs}
    feeds = {"input_ids": inputs["input_ids"].numpy(), "attention_mask": inputs["attention_mask"].numpy()}
    if "model" in graphs:
        return graphs["model"].run(None, feeds)[0]
    hidden = graphs["encoder"].run(None, feeds)[0]
    return graphs["decoder"].run(None, {"decoder_input_ids": inputs["decoder_input_ids"].numpy(),
                                        "encoder_hidden_states": hidden,
                                        "encoder_attention_mask": feeds["attention_mask"]})[0]


def torch_outputs(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()


def other_inputs(model) -> dict:
    """Batch 3, sequence 11 (the export traced 2 x 8), with padding in the first row."""
    inputs = example_inputs_for(model, batch=3, seq=11, seed=7)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, -4:] = 0
    return inputs


@pytest.mark.parametrize("target", ["ort", "standard"])
@pytest.mark.parametrize("name", list(DEMOS))
def test_export_matches_torch(name, target, captured, tmp_path):
    model, graphs = captured(name)
    layers, fusable = DEMOS[name]
    result = write_graphs(graphs, model, tmp_path / f"{name}.onnx", target=target)
    assert [g.role for g in result.graphs] == list(layers)
    for g in result.graphs:
        proto = onnx.load(str(g.path))
        onnx.checker.check_model(proto)
        meta = json.loads({p.key: p.value for p in proto.metadata_props}["sparsify"])
        assert meta["target"] == target and meta["plan"]["selected"]
        fused = count_ops(proto, "MoE", "com.microsoft")
        if target == "ort" and fusable:
            assert fused == layers[g.role] and len(g.report.fused) == layers[g.role]
            assert count_ops(proto, "TopK") == 0  # no router left in standard ops
        else:
            assert fused == 0
            assert count_ops(proto, "TopK") == layers[g.role]
        if target == "ort" and not fusable:  # bert's erf-gelu: left, with the reason
            assert all("tanh approximation" in why for why in g.report.left.values()) and g.report.left
    inputs = other_inputs(model)
    assert rel(onnx_outputs(result, inputs), torch_outputs(model, inputs)) < 1e-4


def static_inputs(model, batch: int, seq: int) -> dict:
    """Inputs of the static shape, with padding in the first row where there is room for it."""
    inputs = example_inputs_for(model, batch=batch, seq=seq, seed=5)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if seq > 1:
        inputs["attention_mask"][0, -1:] = 0
    return inputs


@pytest.mark.parametrize("name,batch,seq", STATIC)
def test_static_export_fuses_as_the_dynamic_one(name, batch, seq, captured, tmp_path):
    """Constant folding rewrites a static graph's routing (its shapes are constants); the same
    layers fuse as in the dynamic export, with the same reasons for the rest, and both targets
    give torch's outputs."""
    model, dynamic_graphs = captured(name)
    dynamic = write_graphs(dynamic_graphs, model, tmp_path / "dynamic.onnx", target="ort")
    layers, _ = DEMOS[name]
    static = [(g.role, ir.to_proto(g.model), g.outputs) for g in capture_graphs(model, dynamic=False, batch=batch, seq=seq)]
    inputs = static_inputs(model, batch, seq)
    for target in TARGETS:
        graphs = [CapturedGraph(r, ir.from_proto(p), o) for r, p, o in static]
        result = write_graphs(graphs, model, tmp_path / f"{target}.onnx", target=target)
        for g, d in zip(result.graphs, dynamic.graphs, strict=True):
            proto = onnx.load(str(g.path))
            dims = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in proto.graph.input}
            assert all(d[:2] == [batch, seq] for d in dims.values()), dims
            if target == "ort":
                assert g.report.to_dict() == d.report.to_dict()
                assert count_ops(proto, "MoE", "com.microsoft") == len(d.report.fused)
                assert count_ops(proto, "TopK") == layers[g.role] - len(d.report.fused)
            else:
                assert count_ops(proto, "TopK") == layers[g.role] and count_ops(proto, "MoE") == 0
        assert rel(onnx_outputs(result, inputs), torch_outputs(model, inputs)) < 1e-4


HF_MOE = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64)),
    "qwen2-moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=64)),
}


@pytest.mark.parametrize("arch", list(HF_MOE))
def test_hf_format_moe_exports_fused(arch, tmp_path):
    """Upcycled models in Hugging Face MoE formats export like native ones (fused, same outputs)."""
    torch.manual_seed(0)
    model = HF_MOE[arch]().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj"):
                m.gate_up_proj.normal_(0, 0.1)
                m.down_proj.normal_(0, 0.1)
            elif type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0, 0.5)
    result = export_onnx(model, tmp_path / f"{arch}.onnx")
    assert count_ops(result.files[0], "MoE", "com.microsoft") == 2
    inputs = other_inputs(model)
    assert rel(onnx_outputs(result, inputs), torch_outputs(model, inputs)) < 1e-4


def test_switch_transformers_format_is_refused_with_reason(tmp_path):
    config = transformers.SwitchTransformersConfig(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, num_experts=2,
                                                   encoder_sparse_step=1, decoder_sparse_step=1,
                                                   decoder_start_token_id=0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with pytest.raises(OptionError, match="per-sequence capacity"):
        export_onnx(model, tmp_path / "switch.onnx")
    assert not list(tmp_path.iterdir())
