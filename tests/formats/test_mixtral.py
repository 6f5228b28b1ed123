"""The Mixtral format: Llama/Mistral -> MixtralForCausalLM, loaded by plain transformers."""

import json

import pytest
import torch
import transformers

from sparsify.formats.registry import get_format
from tests.formats.hf_helpers import (
    EXPERTS, assert_refuses, assert_same_output, dense, load_hf, max_rel_diff, set_moe, upcycled, write_both_ways,
    write_in_memory,
)

MIXTRAL = get_format("mixtral")


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_mixtral_loads_and_reproduces_dense_logits(tmp_path, name):
    moe = upcycled(name, every=1)
    out = write_in_memory("mixtral", moe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == EXPERTS
    assert config["num_experts_per_tok"] == 2
    hf = load_hf(transformers.MixtralForCausalLM, out)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(name)(ids).logits, hf(ids).logits
    assert max_rel_diff(want, got) < 1e-5


def test_mixtral_writes_the_hub_layout(tmp_path):
    out = write_in_memory("mixtral", upcycled("llama", every=1), tmp_path / "out")
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    moe = "model.layers.3.block_sparse_moe"
    assert {f"{moe}.gate.weight", f"{moe}.experts.{EXPERTS - 1}.w1.weight", f"{moe}.experts.0.w3.weight",
            f"{moe}.experts.0.w2.weight"} <= names
    assert not any(".mlp." in n for n in names)


def test_streamed_mixtral_equals_in_memory(tmp_path):
    # with noise the experts differ: each must come from its own seeded noise, in either path
    assert_same_output(*write_both_ways("mixtral", "llama", tmp_path, every=1, noise=0.01))


def _refusal_cases():
    def no_last_layer(plan, config):
        plan.selected = plan.selected[:-1]

    def biased(plan, config):
        plan.sites[0].weights["b1"] = "model.layers.0.mlp.gate_proj.bias"

    def bare_decoder(plan, config):
        for s in plan.sites:
            s.path = s.path.removeprefix("model.")
        plan.selected = [p.removeprefix("model.") for p in plan.selected]
        plan.layers = {p.removeprefix("model."): layer for p, layer in plan.layers.items()}

    return [
        ("llama", no_last_layer, "every layer is an MoE layer, but this plan converts layers 0,1,2 of 4"),
        ("llama", set_moe(router="switch", top_k=1), "routes softmax top-k; --router switch"),
        ("llama", set_moe(normalize=False), "renormalises the top-k routing weights"),
        ("llama", set_moe(capacity_factor=1.25), "dropless; --capacity-factor 1.25"),
        ("llama", biased, "gated silu FFNs without biases; model.layers.0.mlp is a gated silu FFN with biases"),
        ("llama", bare_decoder, "model.layers.N.mlp (a LlamaForCausalLM); found layers.0.mlp"),
        ("llama", lambda plan, config: setattr(config, "attention_bias", True), "attention projections have biases"),
        ("qwen2", None, "Llama/Mistral architecture with MoE FFNs, and this source is 'qwen2'"),
        ("t5", None, "this source is 't5'"),
    ]


@pytest.mark.parametrize("name,alter,reason", _refusal_cases())
def test_mixtral_refuses_with_the_reason(name, alter, reason):
    assert_refuses("mixtral", upcycled(name, every=1), alter, reason)


def test_mixtral_implies_every_layer():
    assert MIXTRAL.default_options(dense("llama").config) == {"every": 1}
    assert MIXTRAL.keeps_meaning(upcycled("llama", every=1).sparsify_plan, dense("llama").config) is None
