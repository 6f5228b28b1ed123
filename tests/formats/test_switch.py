"""The Switch format: relu T5 -> SwitchTransformersForConditionalGeneration."""

import copy
import json
import math

import pytest
import torch
import transformers

from sparsify.formats.registry import get_format
from sparsify.formats.switch import CAPACITY_SEQUENCE, DROPLESS_CAPACITY, switch_sparse_layers
from sparsify.moe.config import MoEConfig
from tests.formats.hf_helpers import (
    EXPERTS, assert_refuses, assert_same_output, dense, load_hf, max_rel_diff, set_moe, upcycled, write_both_ways,
    write_in_memory,
)

SWITCH = get_format("switch")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, 512, (2, 12), generator=g), torch.randint(2, 512, (2, 6), generator=g)


@pytest.mark.parametrize("every,sparse", [(2, [1, 3]), (1, [0, 1, 2, 3])])
def test_switch_loads_generates_and_routes_as_the_converted_model(tmp_path, every, sparse):
    moe = upcycled("t5", every=every, router="switch")
    out = write_in_memory("switch", moe, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["expert_capacity"] == DROPLESS_CAPACITY and config["router_jitter_noise"] == 0.0
    hf = load_hf(transformers.SwitchTransformersForConditionalGeneration, out)
    for stack in (hf.encoder, hf.decoder):
        assert [i for i, block in enumerate(stack.block) if block.is_sparse] == sparse
    ids, dec = _inputs()
    with torch.no_grad():
        got = hf(input_ids=ids, decoder_input_ids=dec).logits
        assert max_rel_diff(moe(input_ids=ids, decoder_input_ids=dec).logits, got) < 1e-5
        # top-1 switch routing scales each FFN output by its router probability: not the dense model
        assert max_rel_diff(dense("t5")(input_ids=ids, decoder_input_ids=dec).logits, got) > 1e-3
        generated = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] > 1


def test_streamed_switch_equals_in_memory(tmp_path):
    assert_same_output(*write_both_ways("switch", "t5", tmp_path, every=2, router="switch"))


def test_gated_t5_is_refused_because_switch_has_no_gated_ffn():
    moe = upcycled("t5-gated", router="switch")
    why = SWITCH.explain(moe.sparsify_plan, moe.config)
    assert why is not None and "no gated FFN" in why and "T5 v1.1" in why


def _refusal_cases():
    def only_block(i):
        def alter(plan, config):
            plan.selected = [s.path for s in plan.sites if s.index == i]
        return alter

    return [
        (set_moe(router="topk", top_k=2), "routes each token to its top-1 expert"),
        (set_moe(router="topk", top_k=1, normalize=True), "this plan routes topk top-1"),
        (set_moe(router_dtype="float64"), "router in float32, not float64"),
        (only_block(3), "this plan converts encoder blocks 3 of 4; use --every 2 or --every 1"),
        (lambda plan, config: setattr(config, "scale_decoder_outputs", False), "does not rescale decoder outputs"),
    ]


@pytest.mark.parametrize("alter,reason", _refusal_cases())
def test_switch_refuses_with_the_reason(alter, reason):
    assert_refuses("switch", upcycled("t5", every=2, router="switch"), alter, reason)


def test_switch_refuses_other_sources():
    assert_refuses("switch", upcycled("llama", router="switch"), None, "this source is 'llama'")


def test_unnormalised_top1_is_switch_routing_and_capacity_is_approximated():
    moe = upcycled("t5", every=2, router="switch")
    plan = copy.deepcopy(moe.sparsify_plan)
    plan.set_routing(MoEConfig(num_experts=EXPERTS, top_k=1, router="topk", normalize=False))
    assert SWITCH.explain(plan, moe.config) is None and SWITCH.keeps_meaning(plan, moe.config) is None
    plan.set_routing(MoEConfig(num_experts=EXPERTS, top_k=1, router="switch", capacity_factor=1.25))
    assert SWITCH.explain(plan, moe.config) is None
    assert "only approximated" in SWITCH.keeps_meaning(plan, moe.config)
    capacity = SWITCH.config_dict(plan, moe.config)["expert_capacity"]
    assert capacity == math.ceil(1.25 * CAPACITY_SEQUENCE / EXPERTS)


@pytest.mark.parametrize("layers,num_sparse", [(4, 2), (4, 4), (5, 2), (3, 1), (6, 3), (6, 2), (4, 0), (1, 1)])
def test_switch_sparse_layers_mirrors_transformers(layers, num_sparse):
    config = transformers.SwitchTransformersConfig(
        vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_experts=2, num_layers=layers,
        num_sparse_encoder_layers=num_sparse,
    )
    stack = transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersStack(config)
    assert switch_sparse_layers(layers, num_sparse) == {i for i, b in enumerate(stack.block) if b.is_sparse}
