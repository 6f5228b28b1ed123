"""FFN forms met in transformers' model zoo, on plain torch modules: constant multipliers inside
the FFN (Falcon-H1: the identity at 1, rejected otherwise), a normalisation across the
intermediate features between the projections (BitNet's and Dory's ffn_sub_norm, ConvNeXt V2's
GRN: rejected, never taken for an activation), and one dropout module applied both between the
projections and after them (XLNet: rejected). Conversions are checked as every conversion is:
outputs before and after, at two routing settings."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.errors import NoFFNFoundError
from tests.passes.test_ffn_forms import D, I, ROUTINGS, assert_preserved, randomised, sites_of, stack


class Multiplied(nn.Module):
    """Falcon-H1's MLP: down(up(x) * silu(gate(x) * g)) * d, with constant multipliers g and d."""

    def __init__(self, gate_multiplier: float = 1.0, down_multiplier: float = 1.0):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)
        self.gate_multiplier, self.down_multiplier = gate_multiplier, down_multiplier

    def forward(self, x):
        y = self.up_proj(x) * F.silu(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(y) * self.down_multiplier


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_multipliers_of_one_are_the_identity_and_the_ffn_converts(routing):
    net, x = stack(Multiplied), torch.randn(2, 5, D)
    site = sites_of(net, x).sites[0]
    assert (site.path, site.activation) == ("0.ffn", "silu")
    assert_preserved(net, x, ROUTINGS[routing])


@pytest.mark.parametrize("multipliers, reason", [
    ((0.5, 1.0), r"activation \(silu\) is applied to the projection.s output scaled by the constant 0\.5"),
    ((1.0, 0.25), r"module '0\.ffn' multiplies the output projection's result by the constant 0\.25"),
])
def test_multipliers_other_than_one_are_rejected_with_their_value(multipliers, reason):
    net = stack(lambda: Multiplied(*multipliers))
    with pytest.raises(NoFFNFoundError, match=reason):
        sites_of(net, torch.randn(2, 5, D))


class SubNormed(nn.Module):
    """BitNet's MLP: down(rms_norm(relu(gate(x))^2 * up(x))); `up_scale` scales up by a learned
    vector first (Dory)."""

    def __init__(self, up_scale: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)
        self.norm = nn.RMSNorm(I, eps=1e-6)
        self.scale = nn.Parameter(torch.ones(I)) if up_scale else None

    def forward(self, x):
        up = self.up_proj(x) if self.scale is None else self.up_proj(x) * self.scale
        return self.down_proj(self.norm(F.relu(self.gate_proj(x)).square() * up))


class GRN(nn.Module):
    """ConvNeXt V2's FFN: pw2(grn(gelu(pw1(x)))), GRN normalising over the positions."""

    def __init__(self):
        super().__init__()
        self.pw1, self.pw2 = nn.Linear(D, I), nn.Linear(I, D)
        self.gamma, self.beta = nn.Parameter(torch.zeros(I)), nn.Parameter(torch.zeros(I))

    def forward(self, x):
        h = F.gelu(self.pw1(x))
        g = torch.linalg.vector_norm(h, ord=2, dim=1, keepdim=True)
        h = self.gamma * (h * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + h
        return self.pw2(h)


@pytest.mark.parametrize("make", [SubNormed, lambda: SubNormed(up_scale=True), GRN],
                         ids=["bitnet", "dory", "convnextv2"])
def test_a_normalisation_between_the_projections_is_rejected_as_not_elementwise(make):
    with pytest.raises(NoFFNFoundError, match=r"rejected candidates: 0\.ffn: the function between the projections "
                                              r"is not elementwise: it reduces with aten\."):
        sites_of(stack(make), torch.randn(2, 5, D))


class TwiceDropped(nn.Module):
    """XLNet's feed-forward: one nn.Dropout module between the projections and after them."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.norm, self.layer_1, self.layer_2 = nn.LayerNorm(D), nn.Linear(D, I), nn.Linear(I, D)
        self.activation_function, self.dropout = nn.GELU(), nn.Dropout(p)

    def forward(self, x):
        h = self.dropout(self.activation_function(self.layer_1(x)))
        return self.norm(self.dropout(self.layer_2(h)) + x)


def test_one_dropout_module_applied_between_and_after_the_projections_is_rejected():
    net = randomised(nn.Sequential(TwiceDropped(), TwiceDropped()))
    with pytest.raises(NoFFNFoundError, match=r"'0\.dropout\.p' sets it there and also outside the FFN"):
        sites_of(net, torch.randn(2, 5, D))


def test_with_rate_zero_the_twice_used_dropout_is_the_identity_and_the_ffn_converts():
    net, x = randomised(nn.Sequential(TwiceDropped(0.0), TwiceDropped(0.0))), torch.randn(2, 5, D)
    site = sites_of(net, x).sites[0]
    assert (site.path, site.exit_path) == ("0.layer_1", "0.layer_2")
    assert_preserved(net, x, ROUTINGS["top1 every1"])


class ScaledDense(nn.Module):
    """A dense FFN of modules whose forward scales the output: the MoE takes fc1..fc2 (a chain) and
    the module goes on scaling what the MoE returns."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, I), nn.GELU(), nn.Linear(I, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) * 0.5


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_a_dense_ffn_of_modules_scaled_by_its_forward_converts_as_a_chain(routing):
    net, x = stack(ScaledDense), torch.randn(2, 5, D)
    site = sites_of(net, x).sites[0]
    assert (site.path, site.exit_path) == ("0.ffn.fc1", "0.ffn.fc2")
    assert_preserved(net, x, ROUTINGS[routing])
