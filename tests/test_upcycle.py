"""Upcycling end to end through the Python API: function preservation and its exceptions."""

import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify import PassManager, passes
from sparsify.errors import OptionError
from sparsify.moe import SparseMoE
from sparsify.verify import compare, main_output
from tests.conftest import DEMO_NAMES


def _moe_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


@pytest.mark.parametrize("name", DEMO_NAMES)
@pytest.mark.parametrize("top_k,every", [(2, 2), (1, 2), (2, 1)])
def test_upcycle_preserves_function(demo, name, top_k, every):
    moe = sparsify.upcycle(f"demo:{name}", experts=8, top_k=top_k, every=every)
    c = compare(demo(name), moe)
    assert c.max_abs < 1e-5 * c.max_ref, (c.max_abs, c.max_ref)
    layers = _moe_layers(moe)
    stacks = moe.sparsify_plan.stacks()
    expected = sum(len([s for s in v if s.index % every == every - 1]) for v in stacks.values())
    assert len(layers) == expected > 0


def test_pass_manager_exactly_as_documented(demo):
    model = demo("t5")
    reference = demo("t5")
    result = PassManager([passes.FindFFN(), passes.SelectLayers(every=2),
                          passes.UpcycleFFN(experts=8, top_k=2)]).run(model)
    assert isinstance(result.model, nn.Module)
    d = result.plan.to_dict()
    layers = d["layers"]
    assert set(layers) == set(d["selected"]) and len(layers) == 4
    assert all(v["moe"]["num_experts"] == 8 and v["moe"]["top_k"] == 2 and len(v["experts"]) == 8 for v in layers.values())
    assert [s.index for s in result.plan.selected_sites] == [1, 3, 1, 3]
    c = compare(reference, result.model)
    assert c.max_abs < 1e-5 * c.max_ref
    assert sparsify.UpcyclePlan.from_dict(d).to_dict() == d


def test_selecting_layers_by_index(demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=None, layers=[0, 2])
    assert [s.index for s in moe.sparsify_plan.selected_sites] == [0, 2]


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.silu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_user_module_upcycle_preserves_function():
    torch.manual_seed(0)
    net = nn.Sequential(*[Block(16) for _ in range(4)]).eval()
    x = torch.randn(3, 7, 16)
    ref = net(x)
    out = sparsify.upcycle(net, experts=4, top_k=2, every=1, example_inputs=(x,))
    assert len(_moe_layers(out)) == 4
    got = out(x)
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    # example_inputs also through the PassManager form
    net2 = nn.Sequential(*[Block(16) for _ in range(2)]).eval()
    res = PassManager([passes.FindFFN(), passes.SelectLayers(every=1), passes.UpcycleFFN(experts=2, top_k=1)]).run(
        net2, example_inputs=(x,))
    assert len(_moe_layers(res.model)) == 2



def test_switch_router_computes_p_times_ffn(demo):
    dense = demo("llama")
    moe = sparsify.upcycle(demo("llama"), experts=4, router="switch", every=1)
    site = moe.sparsify_plan.selected_sites[0]
    layer = moe.get_submodule(site.path)
    assert layer.config.top_k == 1
    x = torch.randn(5, site.hidden_size)
    with torch.no_grad():
        ffn = dense.get_submodule(site.path)(x)
        p = torch.softmax(x.float() @ layer.router.weight.t(), -1).max(-1).values
        assert torch.allclose(layer(x), p.unsqueeze(-1) * ffn, atol=1e-6)
    assert moe.sparsify_plan.moe.why_not_preserving() is not None


def test_no_normalize_weights_do_not_sum_to_one(demo):
    moe = sparsify.upcycle(demo("t5"), experts=8, top_k=2, normalize=False)
    c = compare(demo("t5"), moe)
    assert c.max_abs > 1e-3 * c.max_ref
    assert "normalize" in moe.sparsify_plan.moe.why_not_preserving()


def test_expert_choice_on_encoder_only(demo):
    moe = sparsify.upcycle(demo("bert"), experts=4, top_k=2, router="expert-choice", every=1)
    out = main_output(moe(input_ids=torch.randint(0, 512, (2, 8))))
    assert torch.isfinite(out).all()
    with pytest.raises(OptionError, match="causal"):
        sparsify.upcycle(demo("llama"), experts=4, router="expert-choice")
    with pytest.raises(OptionError, match="causal"):
        sparsify.upcycle(demo("t5"), experts=4, router="expert-choice")


def test_noise_makes_experts_differ_reproducibly(demo):
    a = sparsify.upcycle(demo("gpt2"), experts=4, noise=0.01, seed=3)
    b = sparsify.upcycle(demo("gpt2"), experts=4, noise=0.01, seed=3)
    la, lb = _moe_layers(a)[0], _moe_layers(b)[0]
    assert torch.equal(la.experts.w1, lb.experts.w1)
    assert not torch.equal(la.experts.w1[0], la.experts.w1[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"experts": 1}, "at least 2"),
    ({"experts": 4, "top_k": 0}, "top_k"),  # the Python API names arguments, not CLI flags
    ({"experts": 4, "top_k": 5}, "top_k"),
    ({"experts": 4, "every": 0}, "every"),
    ({"experts": 4, "every": None, "layers": [9]}, "out of range"),
])
def test_bad_options_are_refused(demo, kwargs, match):
    with pytest.raises(OptionError, match=match):
        sparsify.upcycle(demo("llama"), **kwargs)


def test_gradients_reach_router_and_every_expert(demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=1)
    moe.train()
    ids = torch.randint(0, 512, (4, 16))
    moe(input_ids=ids, labels=ids).loss.backward()  # in training the loss includes the router losses
    for layer in _moe_layers(moe):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        per_expert = layer.experts.w1.grad.abs().sum(dim=(1, 2))
        assert (per_expert > 0).all(), per_expert


def test_training_with_aux_losses_lowers_loss(demo):
    torch.manual_seed(0)
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2, noise=0.001)
    moe.train()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (8, 16))  # a fixed tiny task: memorise these sequences
    losses = []
    for _ in range(30):
        out = moe(input_ids=ids, labels=ids)  # the loss includes the router losses
        aux = sparsify.aux_losses(moe)
        assert aux.requires_grad and aux.dim() == 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item() - aux.item())
    assert losses[-1] < 0.7 * losses[0], losses
