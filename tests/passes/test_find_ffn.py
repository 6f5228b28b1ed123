"""find-ffn over real architectures: forms, activations, layouts, owners, stacks, rejections."""

import pytest
import torch
import torch.nn as nn

from sparsify import PassManager, passes
from sparsify.errors import NoFFNFoundError

EXPECTED = {
    # name: (sites, form, activation, layout, split sites, stacks)
    "t5": (8, "dense", "relu", "linear", False, {"encoder.block", "decoder.block"}),
    "t5-gated": (8, "gated", "gelu_tanh", "linear", False, {"encoder.block", "decoder.block"}),
    "bert": (4, "dense", "gelu", "linear", True, {"encoder.layer"}),
    "gpt2": (4, "dense", "gelu_tanh", "conv1d", False, {"transformer.h"}),
    "llama": (4, "gated", "silu", "linear", False, {"model.layers"}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_find_ffn_on_demo_architectures(demo, name):
    n, form, act, layout, split, stacks = EXPECTED[name]
    plan = PassManager([passes.FindFFN()]).run(demo(name)).plan
    assert len(plan.sites) == n
    assert {s.form for s in plan.sites} == {form}
    assert {s.activation for s in plan.sites} == {act}
    assert {s.layout for s in plan.sites} == {layout}
    assert all((s.exit_path is not None) == split for s in plan.sites)
    assert set(plan.stacks()) == stacks
    for stack in plan.stacks().values():
        assert [s.index for s in stack] == list(range(len(stack)))
    assert not plan.rejected


def test_decoder_stacks_are_marked_causal(demo):
    plan = PassManager([passes.FindFFN()]).run(demo("t5")).plan
    assert {s.stack: s.causal for s in plan.sites} == {"encoder.block": False, "decoder.block": True}
    assert all(s.causal for s in PassManager([passes.FindFFN()]).run(demo("llama")).plan.sites)
    assert not any(s.causal for s in PassManager([passes.FindFFN()]).run(demo("bert")).plan.sites)


class MLP(nn.Module):
    def __init__(self, d, f, act=nn.GELU()):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, f), act, nn.Linear(f, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class InlineBlock(nn.Module):
    """FFN written inline, its activation plain code in the block's forward."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_user_module_blocks_are_found():
    net = nn.Sequential(*[Block(16) for _ in range(3)])
    plan = PassManager([passes.FindFFN()]).run(net, example_inputs=(torch.randn(2, 5, 16),)).plan
    assert [s.path for s in plan.sites] == ["0.mlp", "1.mlp", "2.mlp"]
    assert [s.index for s in plan.sites] == [0, 1, 2]
    assert plan.sites[0].weights == {"w1": "0.mlp.up.weight", "w2": "0.mlp.down.weight",
                                      "b1": "0.mlp.up.bias", "b2": "0.mlp.down.bias"}


def test_inline_ffn_with_plain_code_activation_is_rejected_with_reason():
    net = nn.Sequential(InlineBlock(8), InlineBlock(8))
    with pytest.raises(NoFFNFoundError, match=r"activation \(relu\) between the projections is plain code in the forward of '0'"):
        PassManager([passes.FindFFN()]).run(net, example_inputs=(torch.randn(2, 8),))


def test_unknown_activation_is_rejected_with_reason():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.sin(x) * 2.0

    net = nn.Sequential(Block(8), nn.Sequential(MLP(8, 16, act=Odd())))
    plan = PassManager([passes.FindFFN()]).run(net, example_inputs=(torch.randn(2, 8),)).plan
    assert [s.path for s in plan.sites] == ["0.mlp"]
    assert any("not a known activation" in r.reason for r in plan.rejected)


def test_no_projection_pair_at_all():
    with pytest.raises(NoFFNFoundError, match="no FFN found"):
        PassManager([passes.FindFFN()]).run(nn.Sequential(nn.Linear(4, 4)), example_inputs=(torch.randn(1, 4),))
