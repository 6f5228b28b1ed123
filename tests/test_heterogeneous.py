"""Plans whose layers differ (experts, top-k, router, scheme per layer, from a recipe) through every
executor: in memory, streaming from a checkpoint, `sparsify.load`, ONNX export; and the Hugging
Face formats, which hold one MoE setting per model, refuse them with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sparsify
from sparsify import Recipe
from sparsify.convert import convert
from sparsify.errors import OptionError
from sparsify.io.demo import DEMOS
from sparsify.verify import compare

# the stacks of each demo family, written as a user may: a friendly alias or the full name
STACKS = {"t5": ["encoder", "decoder"], "t5-gated": ["encoder.block", "decoder"], "bert": ["encoder"],
          "gpt2": ["transformer.h"], "llama": ["model"], "mistral": ["model.layers"], "qwen2": ["model"],
          "qwen3": ["model"]}
assert set(STACKS) == set(DEMOS)

# every FFN an MoE layer, each layer of a stack different, every one function-preserving
PER_LAYER = {0: {"experts": 4, "top_k": 2}, 1: {"experts": 8, "top_k": 4, "granularity": 2},
             2: {"experts": 2, "top_k": 1, "shared_fraction": 0.25}, 3: {"experts": 6, "top_k": 3}}


def preserving(name: str) -> Recipe:
    return Recipe({"every": 1, **{stack: dict(PER_LAYER) for stack in STACKS[name]}})


def _tensors(out):
    return {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_heterogeneous_layers_in_memory_equal_the_dense_model(demo, name):
    moe = sparsify.upcycle(f"demo:{name}", recipe=preserving(name))
    plan = moe.sparsify_plan
    assert plan.moe is None and plan.why_not_preserving() is None
    for stack in plan.stacks().values():
        assert [plan.layer(s).moe.num_experts for s in stack] == [4, 8, 2, 6]
        assert [plan.layer(s).moe.top_k for s in stack] == [2, 4, 1, 3]
        assert plan.layer(stack[2]).shared is not None and plan.layer(stack[1]).router.groups == 2
    c = compare(demo(name), moe)
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)


T5_PAPER = Recipe(experts=8, every=2, encoder={"router": "expert-choice", "capacity_factor": 2.0, "top_k": 1},
                  decoder={"top_k": 2}, noise=0.01, router_init_std=0.5)
STREAMED = {
    "llama preserving": ("llama", preserving("llama")),
    "t5 preserving": ("t5", preserving("t5")),
    "gpt2 preserving": ("gpt2", preserving("gpt2")),
    "t5 paper recipe": ("t5", T5_PAPER),
}


@pytest.mark.parametrize("case", list(STREAMED))
def test_heterogeneous_layers_stream_and_load_as_in_memory(tmp_path, demo, case):
    name, recipe = STREAMED[case]
    dense = tmp_path / "dense"
    demo(name).save_pretrained(dense)
    report = convert(str(dense), tmp_path / "streamed", recipe=recipe)
    assert report.streamed and report.format == "sparsify-native"
    assert "one MoE setting for the whole model" in report.format_reason or name == "gpt2"
    memory = sparsify.upcycle(str(dense), recipe=recipe)
    sparsify.save(memory, tmp_path / "memory")
    got, want = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = sparsify.load(tmp_path / "streamed")
    assert compare(memory, loaded).max_abs == 0.0
    if memory.sparsify_plan.why_not_preserving() is None:
        c = compare(demo(name), loaded)
        assert c.max_abs <= 1e-5 * c.max_ref


# (family, format, recipe that the format could write if every layer shared it)
HF_REFUSALS = {
    "mixtral": ("llama", "mixtral", Recipe(every=1, experts=4, model={3: {"experts": 8}})),
    "mixtral top-k": ("mistral", "mixtral", Recipe(every=1, experts=4, model={0: {"top_k": 1}})),
    "qwen2-moe": ("qwen2", "qwen2-moe", Recipe(every=1, experts=4, model={1: {"experts": 8}})),
    "qwen3-moe": ("qwen3", "qwen2-moe", Recipe(every=2, experts=4, model={3: {"granularity": 2}})),
    "switch": ("t5", "switch", Recipe(experts=4, router="switch", decoder={"experts": 8})),
}


@pytest.mark.parametrize("case", list(HF_REFUSALS))
def test_hugging_face_formats_refuse_heterogeneous_plans_with_the_reason(tmp_path, case):
    name, fmt, recipe = HF_REFUSALS[case]
    with pytest.raises(OptionError, match=f"--format {fmt} cannot express this conversion: .*one MoE setting for the "
                                          "whole model, and the MoE layers"):
        convert(f"demo:{name}", tmp_path / "out", recipe=recipe, format=fmt)
    assert not list(tmp_path.iterdir())
    report = convert(f"demo:{name}", tmp_path / "auto", recipe=recipe)
    assert report.format == "sparsify-native" and "one MoE setting for the whole model" in report.format_reason
    assert json.loads((tmp_path / "auto" / "sparsify.json").read_text())["format"] == "sparsify-native"


@pytest.mark.parametrize("target", ["ort", "standard"])
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_heterogeneous_layers_export_to_onnx_with_torchs_outputs(tmp_path, name, target):
    from sparsify.onnx.export import export_onnx
    from tests.onnx.test_export import onnx_outputs, other_inputs, rel, torch_outputs

    # distinct experts and a decisive router, so that each layer's routing shows in the outputs
    recipe = Recipe(preserving(name).to_dict(), noise=0.05, router_init_std=0.5)
    if name == "t5":
        recipe = Recipe({**recipe.to_dict(), "encoder": {**PER_LAYER, 3: {"experts": 6, "top_k": 1, "router": "expert-choice",
                                                                         "capacity_factor": 2.0}}})
    sparsify.save(sparsify.upcycle(f"demo:{name}", recipe=recipe), tmp_path / "moe")
    model = sparsify.load(tmp_path / "moe")
    result = export_onnx(model, tmp_path / f"{name}.onnx", target=target)
    inputs = other_inputs(model)
    assert rel(onnx_outputs(result, inputs), torch_outputs(model, inputs)) < 1e-4
