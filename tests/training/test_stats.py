"""Router statistics: what `sparsify.router_stats` reports matches the routing it describes."""

from __future__ import annotations

import math

import pytest
import torch

import sparsify
from sparsify.moe import MoEConfig, Router, SparseMoE
from sparsify.training import RoutingTotals

E = 4
STATS = ("dropped", "entropy", "z_loss", "balancing_loss")


def _layer(cfg: MoEConfig, h: int = 8) -> SparseMoE:
    from sparsify.moe import Experts

    experts = Experts(cfg.num_experts, h, 16, form="gated", activation="silu")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return SparseMoE(Router(h, cfg), experts)


def _stats_of(layer: SparseMoE) -> dict[str, float]:
    wrapper = torch.nn.ModuleDict({"moe": layer})
    stats = sparsify.router_stats(wrapper)
    return {k.removeprefix("router/moe/"): v for k, v in stats.items()}


def test_keys_and_shares_of_an_upcycled_model(demo):
    moe = sparsify.upcycle(demo("llama"), experts=E, top_k=2, every=2, router_init_std=1.0)
    assert sparsify.router_stats(moe) == {}  # nothing before a forward
    moe(input_ids=torch.randint(0, 512, (2, 16)))
    stats = sparsify.router_stats(moe)
    layers = [n for n, m in moe.named_modules() if isinstance(m, SparseMoE)]
    assert set(stats) == {f"router/{n}/{s}" for n in layers for s in (*STATS, *(f"load/{e}" for e in range(E)))}
    for n in layers:
        assert math.isclose(sum(stats[f"router/{n}/load/{e}"] for e in range(E)), 1.0, rel_tol=1e-6)
        assert stats[f"router/{n}/dropped"] == 0.0  # dropless
        assert 0.0 < stats[f"router/{n}/entropy"] < math.log(E)
        assert stats[f"router/{n}/balancing_loss"] >= 1.0 - 1e-6


def test_values_equal_a_direct_computation():
    torch.manual_seed(0)
    layer = _layer(MoEConfig(num_experts=E, top_k=2))
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(3, 10, 8)
    layer(x)
    stats = _stats_of(layer)
    logits = x.reshape(-1, 8) @ layer.router.weight.t()
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices.reshape(-1)
    load = torch.bincount(chosen, minlength=E).float() / chosen.numel()
    assert [stats[f"load/{e}"] for e in range(E)] == pytest.approx(load.tolist(), abs=1e-6)
    assert stats["entropy"] == pytest.approx(-(probs * probs.log()).sum(-1).mean().item(), rel=1e-5)
    assert stats["z_loss"] == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(), rel=1e-5)
    assert stats["balancing_loss"] == pytest.approx(E * (load * probs.mean(0)).sum().item(), rel=1e-5)


def test_a_uniform_router_has_the_maximal_entropy():
    layer = _layer(MoEConfig(num_experts=E, top_k=1))  # router weights are zero: all logits equal
    layer(torch.randn(20, 8))
    stats = _stats_of(layer)
    assert stats["entropy"] == pytest.approx(math.log(E), rel=1e-6)
    assert stats["z_loss"] == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_dropped_share_under_a_capacity():
    layer = _layer(MoEConfig(num_experts=E, top_k=1, capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 wants expert 0
    x = torch.randn(64, 8)
    x[:, 0] = x[:, 0].abs() + 0.1
    layer(x)
    capacity = math.ceil(1.0 * 64 * 1 / E)  # 16 of the 64 tokens fit
    stats = _stats_of(layer)
    assert stats["dropped"] == pytest.approx(1 - capacity / 64)
    assert stats["load/0"] == pytest.approx(1.0)


def test_expert_choice_reports_the_tokens_no_expert_chose():
    layer = _layer(MoEConfig(num_experts=E, router="expert-choice", top_k=1, capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = 10.0  # every expert prefers the same tokens
    x = torch.randn(32, 8)
    layer(x)
    routing = layer.router.last_forward.routing
    unchosen = 32 - routing.token_idx.unique().numel()
    assert unchosen > 0
    assert _stats_of(layer)["dropped"] == pytest.approx(unchosen / 32)


def test_totals_average_over_forwards_and_count_each_once():
    torch.manual_seed(0)
    layer = _layer(MoEConfig(num_experts=E, top_k=1))
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    model = torch.nn.ModuleDict({"moe": layer})
    totals, loads = RoutingTotals(), []
    for _ in range(3):
        layer(torch.randn(16, 8))
        loads.append(torch.bincount(layer.router.last_forward.routing.expert_idx, minlength=E).float())
        totals.add(model)
        totals.add(model)  # the same forward again: not counted twice
    summary = totals.summary()
    want = (torch.stack(loads).sum(0) / (3 * 16)).tolist()
    assert [summary[f"router/moe/load/{e}"] for e in range(E)] == pytest.approx(want, abs=1e-6)
    totals.reset()
    assert not totals and totals.summary() == {}


def test_reading_statistics_keeps_the_aux_losses_differentiable():
    layer = _layer(MoEConfig(num_experts=E, top_k=2))
    layer(torch.randn(16, 8, requires_grad=True))
    _stats_of(layer)
    assert layer.aux_loss().requires_grad


# Hugging Face formats: (demo, format, the layers' path pattern)
HF_FORMATS = [
    ("llama", "mixtral", "model.layers.{i}.mlp"),
    ("qwen2", "qwen2-moe", "model.layers.{i}.mlp"),
    ("t5", "switch", None),
]


@pytest.mark.parametrize("name,fmt,pattern", HF_FORMATS, ids=[f[1] for f in HF_FORMATS])
def test_statistics_of_hugging_face_formats(tmp_path, sparsify_cli, name, fmt, pattern):
    import transformers

    code, _, err = sparsify_cli("upcycle", f"demo:{name}", "--experts", str(E), "--format", fmt, "-o", tmp_path / "out")
    assert code == 0, err
    from_sparsify = sparsify.load(tmp_path / "out")
    from_transformers = sparsify.training.prepare_for_training(
        type(from_sparsify).from_pretrained(tmp_path / "out"))  # the one call such a model needs
    ids = torch.randint(2, 512, (2, 12))
    kwargs = {"decoder_input_ids": ids} if fmt == "switch" else {}
    for model in (from_sparsify, from_transformers):
        assert isinstance(model, transformers.PreTrainedModel)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
        stats = sparsify.router_stats(model)
        layers = sorted({k.split("/")[1] for k in stats})
        assert layers and all(f"router/{n}/{s}" in stats for n in layers for s in STATS)
        if pattern:
            assert set(layers) <= {pattern.format(i=i) for i in range(model.config.num_hidden_layers)}
        for n in layers:
            assert sum(stats[f"router/{n}/load/{e}"] for e in range(E)) == pytest.approx(1.0)
            # fresh routers (weights of std 0.02) are close to uniform: entropy near ln E
            assert 0.9 * math.log(E) < stats[f"router/{n}/entropy"] <= math.log(E) + 1e-6
            assert stats[f"router/{n}/balancing_loss"] >= 1.0 - 1e-3
            assert 0.0 <= stats[f"router/{n}/dropped"] < 1.0
            assert stats[f"router/{n}/z_loss"] > 0.0
    assert sparsify.router_stats(from_sparsify).keys() == sparsify.router_stats(from_transformers).keys()
