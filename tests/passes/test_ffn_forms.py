"""The FFN forms beyond one module of nn.Linear projections, on plain torch modules: fused gate/up
projections, matmul by a parameter or its transpose, 1x1 convolutions, inline FFNs (a chain of
modules called by the layer, with the dropout rate or the activation function an attribute the
layer reads), FFNs shared across layers. Each conversion is checked the way every conversion
is: outputs before and after, at two routing settings; each unsound candidate is rejected with
its reason."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify
from sparsify import PassManager, passes
from sparsify.errors import NoFFNFoundError
from sparsify.plan import FFNSite, UpcyclePlan
from sparsify.rewrite import apply_plan, canonical_weight

D, I = 16, 24
ROUTINGS = {"top2 every2": dict(experts=4), "top1 every1": dict(experts=4, top_k=1, every=1)}


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def sites_of(net: nn.Module, x: torch.Tensor):
    return PassManager([passes.FindFFN()]).run(net, example_inputs=(x,)).plan


def assert_preserved(net: nn.Module, x: torch.Tensor, routing: dict) -> nn.Module:
    """Upcycle a copy of `net`, compare outputs, and rebuild it from the plan alone (as
    `sparsify.load` does) to check that the plan says everything the rewrite did."""
    with torch.no_grad():
        ref = net(x)
    moe = sparsify.upcycle(copy.deepcopy(net), example_inputs=(x,), **routing)
    with torch.no_grad():
        got = moe(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    plan = UpcyclePlan.from_dict(moe.sparsify_plan.to_dict())
    rebuilt = apply_plan(copy.deepcopy(net), plan, copy_weights=False)
    rebuilt.load_state_dict(moe.state_dict())
    with torch.no_grad():  # the rebuilt model runs the reference kernels, the upcycled one the tuned ones
        assert (rebuilt(x) - got).abs().max() <= 1e-6 * ref.abs().max()
    return moe


class Residual(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(D), ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def stack(make, n: int = 2) -> nn.Module:
    return randomised(nn.Sequential(*[Residual(make()) for _ in range(n)]))


class FusedGateUp(nn.Module):
    """act(gate) * up from one projection, cut as `cut` says."""

    def __init__(self, cut: str, gate_first: bool = True, bias: bool = False):
        super().__init__()
        self.cut, self.gate_first = cut, gate_first
        self.gate_up, self.down = nn.Linear(D, 2 * I, bias=bias), nn.Linear(I, D, bias=bias)

    def forward(self, x):
        h = self.gate_up(x)
        if self.cut == "chunk":
            a, b = h.chunk(2, dim=-1)
        elif self.cut == "split":
            a, b = h.split(I, dim=-1)
        elif self.cut == "slice":
            a, b = h[..., :I], h[..., I:]
        else:
            a, b = h[..., ::2], h[..., 1::2]
        gate, up = (a, b) if self.gate_first else (b, a)
        return self.down(F.silu(gate) * up)


FUSED = {
    "chunk": (dict(cut="chunk"), "halves", 0),
    "split up-first": (dict(cut="split", gate_first=False), "halves", 1),
    "slice with bias": (dict(cut="slice", bias=True), "halves", 0),
    "interleaved": (dict(cut="interleaved"), "interleaved", 0),
    "interleaved up-first with bias": (dict(cut="interleaved", gate_first=False, bias=True), "interleaved", 1),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("case", list(FUSED))
def test_fused_gate_up_projections(case, routing):
    options, kind, gate_part = FUSED[case]
    net, x = stack(lambda: FusedGateUp(**options)), torch.randn(2, 5, D)
    (site, _) = sites_of(net, x).sites
    assert site.form == "gated" and site.activation == "silu" and site.intermediate_size == I
    assert site.weights["w1"] == site.weights["w3"] == "0.ffn.gate_up.weight"
    assert site.fused["w1"] == [gate_part, 2, kind] and site.fused["w3"] == [1 - gate_part, 2, kind]
    assert ("b1" in site.fused) == options.get("bias", False)
    assert_preserved(net, x, ROUTINGS[routing])


class Matmul(nn.Module):
    """The projections written as matrix products by parameters."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        transposed = spelling != "matmul [in, out]"
        self.w1 = nn.Parameter(torch.empty((I, D) if transposed else (D, I)))
        self.w2 = nn.Parameter(torch.empty((D, I) if transposed else (I, D)))
        self.b1 = nn.Parameter(torch.empty(I))

    def forward(self, x):
        t = {"x @ W.T": lambda w: w.T, "x @ W.t()": lambda w: w.t(), "x @ W.mT": lambda w: w.mT,
             "transpose(0, 1)": lambda w: w.transpose(0, 1), "matmul [in, out]": lambda w: w}[self.spelling]
        return torch.matmul(F.gelu(x @ t(self.w1) + self.b1), t(self.w2))


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("spelling", ["x @ W.T", "x @ W.t()", "x @ W.mT", "transpose(0, 1)", "matmul [in, out]"])
def test_matmul_projections(spelling, routing):
    net, x = stack(lambda: Matmul(spelling)), torch.randn(2, 5, D)
    (site, _) = sites_of(net, x).sites
    assert site.layout == ("conv1d" if spelling == "matmul [in, out]" else "linear")
    assert site.weights == {"w1": "0.ffn.w1", "w2": "0.ffn.w2", "b1": "0.ffn.b1"} and site.activation == "gelu"
    assert_preserved(net, x, ROUTINGS[routing])


class ConvFFN(nn.Module):
    """A channels-first FFN of 1x1 convolutions ([B, C, L] or [B, C, H, W]), grouped."""

    def __init__(self, dims: int, groups: tuple[int, int]):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.norm = nn.GroupNorm(1, D)
        self.up, self.act, self.down = conv(D, I, 1, groups=groups[0]), nn.GELU(), conv(I, D, 1, groups=groups[1])

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


CONVS = {"conv1d": (1, (1, 1)), "conv1d grouped 4/2": (1, (4, 2)), "conv2d grouped 2/4": (2, (2, 4))}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("case", list(CONVS))
def test_1x1_convolutions_channels_first_and_grouped(case, routing):
    dims, groups = CONVS[case]
    net = randomised(nn.Sequential(ConvFFN(dims, groups), ConvFFN(dims, groups)))
    x = torch.randn(2, D, 7) if dims == 1 else torch.randn(2, D, 3, 4)
    (site, _) = sites_of(net, x).sites
    assert site.layout == "conv1x1" and site.feature_axis == -(dims + 1)
    assert site.groups == {r: g for r, g in zip(("w1", "w2"), groups) if g > 1}
    assert site.path == "0.up" and site.exit_path == "0.down" and site.identities == ["0.act"]
    assert site.dense_param_count() == D * I // groups[0] + D * I // groups[1] + I + D
    assert_preserved(net, x, ROUTINGS[routing])


def test_canonical_weights_of_grouped_convolutions_and_fused_parts():
    conv = randomised(nn.Conv1d(D, I, 1, groups=4))
    site = FFNSite("p", "dense", "relu", D, I, {"w1": "w", "b1": "b"}, layout="conv1x1", groups={"w1": 4})
    x = torch.randn(3, D, 5)
    w = canonical_weight(site, "w1", conv.weight.detach())
    assert w.shape == (I, D)
    assert torch.allclose(torch.einsum("oi,bil->bol", w, x) + conv.bias[:, None], conv(x), atol=1e-6)
    fused = torch.arange(2 * I * D, dtype=torch.float32).reshape(2 * I, D)
    halves = FFNSite("p", "gated", "silu", D, I, {"w1": "w", "w3": "w"}, fused={"w1": [1, 2, "halves"],
                                                                                "w3": [0, 2, "halves"]})
    assert torch.equal(canonical_weight(halves, "w1", fused), fused[I:]) and torch.equal(canonical_weight(halves, "w3", fused), fused[:I])
    gpt2 = FFNSite("p", "gated", "silu", D, I, {"w1": "w", "w3": "w"}, layout="conv1d",
                   fused={"w1": [0, 2, "interleaved"], "w3": [1, 2, "interleaved"]})
    assert torch.equal(canonical_weight(gpt2, "w3", fused.t()), fused[1::2])


def test_projections_of_different_kinds_are_rejected():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.w2 = nn.Linear(D, I), nn.Parameter(torch.empty(I, D))

        def forward(self, x):
            return torch.matmul(F.relu(self.up(x)), self.w2)

    with pytest.raises(NoFFNFoundError, match=r"the projections are of different kinds \(conv1d, linear\)"):
        sites_of(stack(Mixed), torch.randn(2, D))


class InlineBlock(nn.Module):
    """An FFN written inline in the block: fc1, an activation and a dropout, fc2, residual."""

    def __init__(self, activation: str = "module", dropout: str = "module", p: float = 0.25):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, I), nn.Linear(I, D)
        self.activation_kind, self.dropout_kind = activation, dropout
        self.act = {"module": nn.GELU(), "function": F.gelu, "plain": None, "reused": F.gelu}[activation]
        self.drop = nn.Dropout(p) if dropout == "module" else None
        self.activation_dropout = p  # a rate attribute the forward reads
        self.hidden_dropout = p  # another one, equal, read after the FFN
        self.rates = {"p": p}

    def forward(self, x):
        h = self.fc1(self.norm(x))
        h = torch.relu(h) if self.activation_kind == "plain" else self.act(h)
        if self.dropout_kind == "module":
            h = self.drop(h)
        elif self.dropout_kind == "attribute":
            h = F.dropout(h, p=self.activation_dropout, training=self.training)
        elif self.dropout_kind == "dict":
            h = F.dropout(h, p=self.rates["p"], training=self.training)
        y = F.dropout(self.fc2(h), p=self.hidden_dropout, training=self.training)
        if self.activation_kind == "reused":
            y = self.act(y)  # the activation attribute is used outside the FFN too
        return x + y


INLINE = {
    # name: (block options, identities, overrides)
    "modules": (dict(), ["0.act", "0.drop"], {}),
    "dropout rate attribute": (dict(dropout="attribute"), ["0.act"], {"0.activation_dropout": 0.0}),
    "activation function attribute": (dict(activation="function"), ["0.drop"], {"0.act": {"function": "identity"}}),
    "both attributes": (dict(activation="function", dropout="attribute"), [],
                        {"0.act": {"function": "identity"}, "0.activation_dropout": 0.0}),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("case", list(INLINE))
def test_inline_ffns_become_a_chain_of_modules(case, routing):
    options, identities, overrides = INLINE[case]
    net, x = randomised(nn.Sequential(InlineBlock(**options), InlineBlock(**options))), torch.randn(2, 5, D)
    site = sites_of(net, x).sites[0]
    assert (site.path, site.exit_path, site.identities, site.overrides) == ("0.fc1", "0.fc2", identities, overrides)
    assert site.dropout == 0.25  # the MoE applies the dropout between the projections in training
    moe = assert_preserved(net, x, ROUTINGS[routing])
    layer = moe[1]
    assert isinstance(layer.fc1, sparsify.moe.SparseMoE) and layer.fc1.experts.dropout == 0.25
    assert isinstance(layer.fc2, nn.Identity) and layer.hidden_dropout == 0.25  # the dropout after the FFN stays
    if "0.activation_dropout" in overrides:
        assert layer.activation_dropout == 0.0


def test_inline_dropout_is_applied_by_the_moe_alone_in_training():
    """In training the MoE drops hidden units at the FFN's rate and the layer no longer does:
    with the experts' rate set to 0 a training forward equals the eval one (nothing else drops)."""
    net = randomised(nn.Sequential(InlineBlock(dropout="attribute", p=0.0), InlineBlock(dropout="attribute", p=0.0)))
    for block in net:
        block.activation_dropout = 0.5
    x = torch.randn(2, 5, D)
    moe = sparsify.upcycle(copy.deepcopy(net), example_inputs=(x,), experts=4, top_k=1, every=1)
    assert all(b.fc1.experts.dropout == 0.5 and b.activation_dropout == 0.0 for b in moe)
    with torch.no_grad():
        evaluated = moe(x)
        assert not torch.equal(moe.train()(x), evaluated)  # the MoE drops
        for b in moe:
            b.fc1.experts.dropout = 0.0
        assert torch.equal(moe(x), evaluated)  # and nothing else does


REJECTED = {
    "plain-code activation": (dict(activation="plain"), r"activation \(relu\) between the projections is plain code"),
    # two attributes hold 0.25, and the probe finds that neither is the rate the FFN applies
    "rate from a dict": (dict(dropout="dict"), "no single attribute of '0' holds the dropout rate"),
    "activation used elsewhere": (dict(activation="reused"), "no single attribute of '0' holds the activation"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_inline_pieces_the_moe_cannot_take_over_are_rejected(case):
    options, reason = REJECTED[case]
    net = randomised(nn.Sequential(InlineBlock(**options), InlineBlock(**options)))
    with pytest.raises(NoFFNFoundError, match=reason):
        sites_of(net, torch.randn(2, 5, D))


def test_a_chain_module_registered_twice_is_rejected():
    net = randomised(nn.Sequential(InlineBlock(), InlineBlock()))
    net[0].alias = net[0].act  # the activation module under a second name
    plan = sites_of(net, torch.randn(2, D))
    assert [s.path for s in plan.sites] == ["1.fc1"]
    assert "registered under several names" in plan.rejected[0].reason


class SharedFFN(nn.Module):
    """Every block calls the one FFN module it is given (weights shared across layers)."""

    def __init__(self, ffn: nn.Module, depth: int):
        super().__init__()
        self.ffn = ffn
        self.layers = nn.ModuleList([nn.LayerNorm(D) for _ in range(depth)])

    def forward(self, x):
        for norm in self.layers:
            x = x + self.ffn(norm(x))
        return x


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, I), nn.GELU(), nn.Linear(I, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_an_ffn_shared_across_layers_is_one_moe_for_every_call(routing):
    net, x = randomised(SharedFFN(MLP(), depth=3)), torch.randn(2, 5, D)
    (site,) = sites_of(net, x).sites
    assert site.path == "ffn" and site.indices == [0, 1, 2]  # one module, one layer per call
    moe = assert_preserved(net, x, ROUTINGS[routing])
    assert isinstance(moe.ffn, sparsify.moe.SparseMoE)


def test_albert_like_sharing_counts_one_layer_per_call_and_every_2_converts_the_shared_ffn():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.groups = nn.ModuleList([Residual(MLP())])  # one layer module, run at every depth

        def forward(self, x):
            for _ in range(4):
                x = self.groups[0](x)
            return x

    net, x = randomised(Encoder()), torch.randn(2, 5, D)
    (site,) = sites_of(net, x).sites
    assert site.path == "groups.0.ffn" and site.indices == [0, 1, 2, 3]
    moe = assert_preserved(net, x, ROUTINGS["top2 every2"])
    assert moe.sparsify_plan.selected == ["groups.0.ffn"]


class XIELU(nn.Module):
    """An FFN whose activation has learned parameters: transformers' own xIELU module (Apertus),
    or a near miss of it that must not be taken for it."""

    def __init__(self, activation: str, dtype: torch.dtype):
        super().__init__()
        from transformers.activations import XIELUActivation

        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)
        self.act = XIELUActivation(dtype=dtype)
        self.near_miss = activation == "near miss"

    def forward(self, x):
        h = self.up(x)
        if self.near_miss:  # xIELU's negative branch with 2x where it has x
            a = self.act
            h = torch.where(h > 0, F.softplus(a.alpha_p) * h * h + a.beta * h,
                            (torch.expm1(torch.min(h, a.eps)) - 2 * h) * (a.beta + F.softplus(a.alpha_n)) + a.beta * h)
        else:
            h = self.act(h)
        return self.down(h)


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32 parameters", "bfloat16 parameters"])
def test_parametrised_activation_keeps_each_layers_parameters(dtype, routing):
    net, x = stack(lambda: XIELU("xielu", dtype)), torch.randn(2, 5, D)
    for i, block in enumerate(net):  # each layer learned its own values
        block.ffn.act.beta.fill_(0.5 + 0.1 * i)
        block.ffn.act.eps.fill_(-1e-6 * (i + 1))
    site = sites_of(net, x).sites[0]
    assert site.activation == "xielu" and site.path == "0.ffn"
    assert site.activation_params == {n: f"0.ffn.act.{n}" for n in ("alpha_p", "alpha_n", "beta", "eps")}
    moe = assert_preserved(net, x, ROUTINGS[routing])
    params = moe[1].ffn.experts.act_params
    assert params["beta"].dtype == dtype and float(params["beta"]) == float(net[1].ffn.act.beta)
    assert not params["beta"].requires_grad and params["alpha_p"].requires_grad  # a buffer stays fixed


def test_a_near_miss_of_a_parametrised_activation_is_not_taken_for_it():
    with pytest.raises(NoFFNFoundError, match="not a known activation"):
        sites_of(stack(lambda: XIELU("near miss", torch.float32)), torch.randn(2, 5, D))


class SpeltOut(nn.Module):
    """An activation written as a product of the projection with a function of itself: CLIP's
    quick_gelu (x * sigmoid(1.702 x)) and SiLU (x * sigmoid(x)). One projection on both sides of
    the product is not a gated FFN; the whole product is the activation."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.fc1, self.fc2 = scale, nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(self.scale * h))


@pytest.mark.parametrize("scale,name", [(1.702, "quick_gelu"), (1.0, "silu")])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_an_activation_spelt_as_a_product_with_its_input_is_the_dense_form(scale, name, routing):
    net = stack(lambda: SpeltOut(scale))
    x = torch.randn(2, 5, D)
    sites = sites_of(net, x).sites
    assert [(s.form, s.activation) for s in sites] == [("dense", name)] * 2
    assert_preserved(net, x, ROUTINGS[routing])
