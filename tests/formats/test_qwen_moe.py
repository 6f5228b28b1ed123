"""The Qwen-MoE format: Qwen2 -> Qwen2MoeForCausalLM, Qwen3 -> Qwen3MoeForCausalLM."""

import copy
import json

import pytest
import torch
import transformers

from sparsify.formats.qwen_moe import sparse_step_layout
from sparsify.formats.registry import get_format
from tests.formats.hf_helpers import (
    EXPERTS, assert_refuses, assert_same_output, dense, load_hf, max_rel_diff, set_moe, upcycled, write_both_ways,
    write_in_memory,
)

@pytest.mark.parametrize("name,options,cls,sparse", [
    ("qwen2", {"every": 2}, transformers.Qwen2MoeForCausalLM, [1, 3]),
    ("qwen2", {"layers": [0, 3]}, transformers.Qwen2MoeForCausalLM, [0, 3]),
    ("qwen3", {"every": 1}, transformers.Qwen3MoeForCausalLM, [0, 1, 2, 3]),
    ("qwen3", {"every": 1, "normalize": False}, transformers.Qwen3MoeForCausalLM, [0, 1, 2, 3]),
])
def test_qwen_moe_loads_and_computes_as_the_converted_model(tmp_path, name, options, cls, sparse):
    moe = upcycled(name, **options)
    out = write_in_memory("qwen2-moe", moe, tmp_path / "out")
    hf = load_hf(cls, out)
    assert [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")] == sparse
    assert hf.config.num_experts == EXPERTS and hf.config.norm_topk_prob == options.get("normalize", True)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(ids).logits
        assert max_rel_diff(moe(ids).logits, got) < 1e-5
        if options.get("normalize", True):  # renormalised top-k with identical experts: the dense model
            assert max_rel_diff(dense(name)(ids).logits, got) < 1e-5


def test_qwen2_moe_has_an_empty_shared_expert(tmp_path):
    out = write_in_memory("qwen2-moe", upcycled("qwen2", every=2), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == 0
    hf = load_hf(transformers.Qwen2MoeForCausalLM, out)
    block = hf.model.layers[1].mlp
    x = torch.randn(5, hf.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(block.shared_expert(x), torch.zeros_like(x))
    assert torch.equal(block.shared_expert_gate.weight, torch.zeros_like(block.shared_expert_gate.weight))


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_streamed_qwen_moe_equals_in_memory(tmp_path, name):
    assert_same_output(*write_both_ways("qwen2-moe", name, tmp_path, every=2))


def test_qwen_moe_keeps_meaning_unless_the_plan_jitters():
    plan = upcycled("qwen2", every=2).sparsify_plan
    qwen = get_format("qwen2-moe")
    assert qwen.keeps_meaning(plan, dense("qwen2").config) is None
    plan = copy.deepcopy(plan)
    set_moe(jitter=0.01)(plan, None)
    assert "no router jitter" in qwen.keeps_meaning(plan, dense("qwen2").config)


@pytest.mark.parametrize("layers,sparse,every,expected", [
    (4, {1, 3}, 2, (2, [])),
    (4, {0, 1, 2, 3}, 1, (1, [])),
    (6, {2, 5}, 3, (3, [])),
    (4, {0, 3}, None, (1, [1, 2])),
    (5, {1, 3}, None, (1, [0, 2, 4])),
])
def test_sparse_step_layout_matches_qwen_rule(layers, sparse, every, expected):
    step, dense_layers = sparse_step_layout(layers, sparse, every)
    assert (step, dense_layers) == expected
    # Qwen2MoeDecoderLayer: sparse when not mlp-only and (i + 1) % decoder_sparse_step == 0
    assert {i for i in range(layers) if i not in dense_layers and (i + 1) % step == 0} == sparse


def _refusal_cases():
    def mixed_sliding(plan, config):
        config.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]

    return [
        ("qwen3", set_moe(router="switch", top_k=1), "routes softmax top-k; --router switch"),
        ("qwen3", set_moe(router="expert-choice"), "--router expert-choice"),
        ("qwen2", set_moe(capacity_factor=2.0), "dropless; --capacity-factor 2.0"),
        ("qwen3", mixed_sliding, "mixes sliding-window and full-attention layers"),
        ("llama", None, "takes Qwen2 or Qwen3 sources"),
        ("gpt2", None, "this source is 'gpt2'"),
    ]


@pytest.mark.parametrize("name,alter,reason", _refusal_cases())
def test_qwen_moe_refuses_with_the_reason(name, alter, reason):
    assert_refuses("qwen2-moe", upcycled(name, every=2), alter, reason)
