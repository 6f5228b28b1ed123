"""Models that are not checkpoints of a transformers family: torch's own transformer layers, and
a transformers model built directly from its config (no `architectures` in the config)."""

import copy

import pytest
import torch
import torch.nn as nn

import sparsify
from sparsify.moe import SparseMoE
from sparsify.plan import UpcyclePlan
from sparsify.rewrite import apply_plan

D, FF = 16, 32
ROUTINGS = {"top2 every2": dict(experts=4), "top1 every1": dict(experts=4, top_k=1, every=1)}
ENCODERS = {
    # name: layer options; the activation reaches the layer as a function, a string or a module
    "relu function": dict(),
    "gelu string, norm first": dict(activation="gelu", norm_first=True),
    "gelu module": dict(activation=nn.GELU()),
}


def _randomised(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _rebuilt(net: nn.Module, moe: nn.Module) -> nn.Module:
    """`net` rewritten from the plan alone and given the upcycled weights (what loading does)."""
    rebuilt = apply_plan(copy.deepcopy(net), UpcyclePlan.from_dict(moe.sparsify_plan.to_dict()), copy_weights=False)
    rebuilt.load_state_dict(moe.state_dict())
    return rebuilt.eval()


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("case", list(ENCODERS))
def test_torch_transformer_encoder(case, routing):
    layer = nn.TransformerEncoderLayer(D, 4, FF, dropout=0.1, batch_first=True, **ENCODERS[case])
    net = _randomised(nn.TransformerEncoder(layer, 4, enable_nested_tensor=True))
    x = torch.randn(2, 5, D)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.no_grad():
        plain, padded = net(x), net(x, src_key_padding_mask=padding)
    moe = sparsify.upcycle(copy.deepcopy(net), example_inputs=(x,), **ROUTINGS[routing])
    site = moe.sparsify_plan.sites[0]
    module = isinstance(ENCODERS[case].get("activation"), nn.Module)
    identities = ["layers.0.activation", "layers.0.dropout"] if module else ["layers.0.dropout"]
    assert (site.path, site.exit_path, site.identities) == ("layers.0.linear1", "layers.0.linear2", identities)
    assert site.dropout == 0.1  # kept for training, inside the MoE
    # the layer's fast path (which reads linear1.weight) is switched off; a function activation is taken over
    assert site.overrides["layers.0.activation_relu_or_gelu"] == 0 and site.overrides["use_nested_tensor"] is False
    assert ("layers.0.activation" in site.overrides) == (not module)
    assert isinstance(moe.layers[1].linear1, SparseMoE)
    for model in (moe, _rebuilt(net, moe)):
        with torch.no_grad():
            got, got_padded = model(x), model(x, src_key_padding_mask=padding)
        assert (got - plain).abs().max() <= 1e-5 * plain.abs().max()
        # torch's nested-tensor fast path zeroes padded positions; only the others are defined
        assert (got_padded - padded)[~padding].abs().max() <= 1e-5 * padded.abs().max()


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_torch_transformer_decoder(routing):
    layer = nn.TransformerDecoderLayer(D, 4, FF, batch_first=True, activation="gelu")
    net = _randomised(nn.TransformerDecoder(layer, 2))
    tgt, memory = torch.randn(2, 5, D), torch.randn(2, 7, D)
    with torch.no_grad():
        ref = net(tgt, memory)
    moe = sparsify.upcycle(copy.deepcopy(net), example_inputs=(tgt, memory), **ROUTINGS[routing])
    assert moe.sparsify_plan.sites[0].overrides == {"layers.0.activation": {"function": "identity"}}
    for model in (moe, _rebuilt(net, moe)):
        with torch.no_grad():
            got = model(tgt, memory)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_model_built_from_its_config_saves_and_loads(tmp_path):
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8)
    assert not config.architectures
    dense = _randomised(transformers.ViTModel(config))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = dense(pixel_values=pixels).last_hidden_state
    moe = sparsify.upcycle(copy.deepcopy(dense), experts=4, every=1, example_kwargs={"pixel_values": pixels})
    sparsify.save(moe, tmp_path / "out")
    loaded = sparsify.load(tmp_path / "out")
    assert type(loaded) is transformers.ViTModel
    with torch.no_grad():
        got = loaded(pixel_values=pixels).last_hidden_state
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
