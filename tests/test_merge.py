"""Experts from several checkpoints, on every demo family.

Sources are "fine-tunes" of one demo base (seeded noise on every weight). Each check reads the
written output back: expert e holds source e's FFN, the other tensors are the base's or their
mean over the base and the sources, the streamed output equals the in-memory one, and with the
router forced to expert i the loaded MoE computes what the base computes with source i's FFNs.
"""

import copy

import pytest
import torch

import sparsify
from sparsify.convert import convert
from sparsify.io.demo import DEMOS
from sparsify.moe.router import Routing
from sparsify.rewrite import canonical_weight
from tests.finetunes import perturbed, save_checkpoint
from tests.test_convert import _tensors

FAMILIES = sorted(DEMOS)


@pytest.fixture
def sources(tmp_path):
    """`sources(name, n)` -> (base dir, [n source dirs]) of demo `name`."""

    def make(name, n=2):
        base = save_checkpoint(perturbed(name, 0, scale=0.0), tmp_path / "base")
        return base, [save_checkpoint(perturbed(name, i + 1), tmp_path / f"src{i}") for i in range(n)]

    return make


def forced(model, expert):
    """Route every token of every MoE layer of `model` to `expert` alone (weight 1)."""

    def hook(router, args, out):
        t = args[0].shape[0]
        return Routing(torch.arange(t), torch.full((t,), expert), torch.ones(t, dtype=out.weight.dtype))

    return [m.router.register_forward_hook(hook) for m in model.modules() if isinstance(m, sparsify.SparseMoE)]


@torch.no_grad()
def with_ffns_of(base, source, plan):
    """The dense `base` with the selected FFNs' weights of `source` (what expert i should compute)."""
    out = copy.deepcopy(base)
    for site in plan.selected_sites:
        for name in site.weights.values():
            out.get_parameter(name).copy_(source.get_parameter(name))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_each_expert_is_its_sources_ffn_and_forced_routing_computes_it(tmp_path, sources, name):
    base_dir, srcs = sources(name)
    r = convert(str(base_dir), tmp_path / "out", experts_from=[str(s) for s in srcs], format="native", every=1)
    assert r.streamed and r.plan.why_not_preserving() == "experts come from other checkpoints than the base"
    assert list(r.plan.sources) == [str(s) for s in srcs] and all(v["xxh3_128"] for v in r.plan.sources.values())
    written = _tensors(tmp_path / "out")
    base, tuned = perturbed(name, 0, scale=0.0), [perturbed(name, i + 1) for i in range(2)]
    for site in r.plan.selected_sites:
        for role, pname in site.weights.items():
            stacked = written[f"{site.path}.experts.{role}"]
            for e, model in enumerate(tuned):
                assert torch.equal(stacked[e], canonical_weight(site, role, model.get_parameter(pname).detach()))
    moe_names = {n for s in r.plan.selected_sites for n in s.weights.values()}
    for pname, t in base.state_dict().items():
        if pname in written and pname not in moe_names:
            assert torch.equal(written[pname], t), pname
    loaded = sparsify.load(tmp_path / "out")
    for e, model in enumerate(tuned):
        handles = forced(loaded, e)
        try:
            from sparsify.verify import compare

            c = compare(with_ffns_of(base, model, r.plan), loaded)
        finally:
            for h in handles:
                h.remove()
        assert c.max_abs <= 1e-5 * c.max_ref, (e, c)


@pytest.mark.parametrize("name", FAMILIES)
def test_average_merge_base_is_the_mean_of_base_and_sources(tmp_path, sources, name):
    base_dir, srcs = sources(name)
    # a source listed twice, and the base among the sources, each count once in the mean
    spec = [str(srcs[0]), str(base_dir), str(srcs[1]), str(srcs[0])]
    moe = sparsify.upcycle(str(base_dir), experts_from=spec, merge_base="average", every=1)
    assert moe.sparsify_plan.why_not_preserving() == "the non-FFN weights are averaged over several checkpoints"
    models = [perturbed(name, 0, scale=0.0), perturbed(name, 1), perturbed(name, 2)]
    got = moe.state_dict()
    checked = 0
    for pname, t in models[0].state_dict().items():
        if pname in got and t.is_floating_point():
            mean = sum(m.state_dict()[pname].float() for m in models) / 3
            assert torch.equal(got[pname], mean.to(t.dtype)), pname
            checked += 1
    assert checked > 4


@pytest.mark.parametrize("name,merge_base", [("llama", "base"), ("gpt2", "average"), ("t5", "average")])
def test_streamed_merge_equals_in_memory_merge(tmp_path, sources, name, merge_base):
    base_dir, srcs = sources(name, n=3)
    spec = [str(srcs[2]), str(srcs[0]), str(srcs[1]), str(srcs[0])]
    convert(str(base_dir), tmp_path / "s", experts_from=spec, merge_base=merge_base, format="native", noise=0.01,
            drop_ratio=0.25)
    moe = sparsify.upcycle(str(base_dir), experts_from=spec, merge_base=merge_base, noise=0.01, drop_ratio=0.25)
    sparsify.save(moe, tmp_path / "m")
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_experts_from_in_memory_models_and_granular_groups(demo):
    base, tuned = demo("llama"), [perturbed("llama", 1), perturbed("llama", 2)]
    moe = sparsify.upcycle(base, experts_from=tuned, granularity=2, top_k=2, every=1)
    plan = moe.sparsify_plan
    assert plan.layer(plan.selected_sites[0]).moe.num_experts == 4  # two sources x two shards
    assert list(plan.sources) == ["module0", "module1"]
    assert [x.source for x in plan.layer(plan.selected_sites[0]).experts] == ["module0", "module0", "module1", "module1"]
    site = plan.selected_sites[0]
    w1 = moe.get_submodule(site.path).experts.w1
    half = site.intermediate_size // 2
    assert torch.equal(w1[3], tuned[1].get_parameter(site.weights["w1"])[half:])


@pytest.mark.parametrize("name,fmt,cls", [
    ("llama", "mixtral", "MixtralForCausalLM"),
    ("mistral", "mixtral", "MixtralForCausalLM"),
    ("qwen2", "qwen2-moe", "Qwen2MoeForCausalLM"),
    ("qwen3", "qwen2-moe", "Qwen3MoeForCausalLM"),
])
def test_hugging_face_formats_write_each_sources_experts(tmp_path, sources, name, fmt, cls):
    import transformers

    base_dir, srcs = sources(name, n=4)
    r = convert(str(base_dir), tmp_path / "out", experts_from=[str(s) for s in srcs], format=fmt, every=1)
    assert r.format == fmt and r.plan.layer(r.plan.selected_sites[0]).moe.num_experts == 4
    model = getattr(transformers, cls).from_pretrained(tmp_path / "out").eval()
    base, tuned = perturbed(name, 0, scale=0.0), [perturbed(name, i + 1) for i in range(4)]
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    for e in (0, 3):
        def hook(gate, args, out, e=e):
            logits, scores, index = out
            index = torch.stack([torch.full_like(index[:, 0], e), torch.full_like(index[:, 0], (e + 1) % 4)], 1)
            return logits, torch.stack([torch.ones_like(scores[:, 0]), torch.zeros_like(scores[:, 0])], 1), index

        handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = with_ffns_of(base, tuned[e], r.plan)(input_ids=ids).logits
        for h in handles:
            h.remove()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), e
