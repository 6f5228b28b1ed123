"""The initialisation schemes beyond plain copies: granular, shared expert, Drop-Upcycling, split.

Function-preserving schemes are checked the way every conversion is: outputs before and after
on the same inputs, for every demo family; Drop-Upcycling by reading back which neurons of each
expert changed and what they were drawn from.
"""

import json

import pytest
import torch

import sparsify
from sparsify.errors import OptionError
from sparsify.io.demo import DEMOS
from sparsify.plan import UpcyclePlan
from sparsify.verify import compare

FAMILIES = sorted(DEMOS)
PRESERVING = {
    "granular G=2": dict(experts=4, top_k=2, granularity=2),
    "granular G=4": dict(experts=8, top_k=4, granularity=4),
    "shared 1/4": dict(experts=4, top_k=2, shared_fraction=0.25),
    "shared + granular": dict(experts=4, top_k=2, shared_fraction=0.5, granularity=2),
}


@pytest.mark.parametrize("scheme", list(PRESERVING))
@pytest.mark.parametrize("name", FAMILIES)
def test_function_preserving_schemes_equal_the_dense_model(demo, name, scheme):
    moe = sparsify.upcycle(f"demo:{name}", every=1, **PRESERVING[scheme])
    plan = moe.sparsify_plan
    assert plan.why_not_preserving() is None
    c = compare(demo(name), moe)
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)


def _experts(moe, path):
    return moe.get_submodule(path).experts


def test_granular_experts_hold_shards_and_routers_repeat_rows(demo):
    dense = demo("llama")
    moe = sparsify.upcycle("demo:llama", experts=8, top_k=4, granularity=4, every=1)
    site = moe.sparsify_plan.selected_sites[0]
    w1 = dense.get_parameter(site.weights["w1"]).detach()
    w2 = dense.get_parameter(site.weights["w2"]).detach()
    layer = moe.get_submodule(site.path)
    width = site.intermediate_size // 4
    for e in range(8):
        g = e % 4
        assert torch.equal(layer.experts.w1[e], w1[g * width:(g + 1) * width])
        assert torch.equal(layer.experts.w2[e], 4 * w2[:, g * width:(g + 1) * width])
    rows = layer.router.weight
    for j in range(2):
        assert all(torch.equal(rows[j * 4], rows[j * 4 + g]) for g in range(4))
    assert not torch.equal(rows[0], rows[4])


def test_shared_expert_holds_the_first_share_and_routed_the_rest(demo):
    dense = demo("llama")
    moe = sparsify.upcycle("demo:llama", experts=4, top_k=2, shared_fraction=0.25, every=1)
    site = moe.sparsify_plan.selected_sites[0]
    w3 = dense.get_parameter(site.weights["w3"]).detach()
    layer = moe.get_submodule(site.path)
    s = site.intermediate_size // 4
    assert torch.equal(layer.shared.w3, w3[:s])
    assert all(torch.equal(layer.experts.w3[e], w3[s:]) for e in range(4))


def test_drop_upcycling_reinitialises_the_share_from_the_weights_statistics(demo):
    dense = demo("llama")
    r = 0.5
    moe = sparsify.upcycle("demo:llama", experts=4, top_k=2, drop_ratio=r, every=1)
    plan = moe.sparsify_plan
    assert "Drop-Upcycling" in plan.why_not_preserving()
    for site in plan.selected_sites:
        n = site.intermediate_size
        orig = {role: dense.get_parameter(site.weights[role]).detach() for role in ("w1", "w2", "w3")}
        experts = _experts(moe, site.path).requires_grad_(False)
        sets = []
        for e in range(4):
            changed = {role: ~torch.isclose(getattr(experts, role)[e], orig[role]).all(dim=1 if role != "w2" else 0)
                       for role in orig}
            rows = changed["w1"].nonzero().flatten().tolist()
            assert len(rows) == round(r * n)
            # the same neurons in the gate and up rows and the down columns
            assert changed["w3"].nonzero().flatten().tolist() == rows
            assert changed["w2"].nonzero().flatten().tolist() == rows
            keep = [i for i in range(n) if i not in set(rows)]
            assert torch.equal(experts.w1[e][keep], orig["w1"][keep])
            for role in orig:
                fresh = getattr(experts, role)[e].index_select(0 if role != "w2" else 1, torch.tensor(rows))
                ref = orig[role]
                assert abs(float(fresh.mean()) - float(ref.mean())) < 4 * float(ref.std()) / fresh.numel() ** 0.5
                assert abs(float(fresh.std()) / float(ref.std()) - 1) < 0.1
            sets.append(frozenset(rows))
        assert len(set(sets)) == 4, "every expert re-initialises its own set of neurons"


def test_split_is_parameter_neutral_and_says_it_is_not_preserving(demo):
    moe = sparsify.upcycle("demo:llama", experts=4, top_k=1, split=True, every=1)
    plan = moe.sparsify_plan
    dense = sum(p.numel() for p in demo("llama").parameters())
    total, active = plan.param_counts(dense)
    assert total == dense + sum(4 * s.hidden_size for s in plan.selected_sites)  # only routers added
    assert active < dense
    assert "parameter-neutral" in plan.why_not_preserving()
    site = plan.selected_sites[0]
    assert _experts(moe, site.path).w1.shape[1] == site.intermediate_size // 4


@pytest.mark.parametrize("options,match", [
    (dict(experts=4, top_k=1, granularity=2), "multiples of 2"),
    (dict(experts=6, top_k=2, granularity=4), "multiples of 4"),
    (dict(experts=4, shared_fraction=1.0), "below 1"),
    (dict(experts=4, drop_ratio=1.5), "drop_ratio"),
    (dict(experts=4, drop_ratio=float("nan")), "drop_ratio"),
    (dict(experts=4, split=True, granularity=2), "exclude each other"),
    (dict(experts=5, split=True, top_k=1), "do not split into 5 equal experts"),
    (dict(experts=4, bogus=1), "unexpected keyword argument 'bogus'"),
])
def test_bad_scheme_options_are_refused_by_name(options, match):
    with pytest.raises(OptionError, match=match):
        sparsify.upcycle("demo:llama", every=1, **options)


SCHEMES = {
    "granular": ["--granularity", "2"],
    "shared": ["--shared-fraction", "0.25"],
    "drop": ["--drop-ratio", "0.3", "--noise", "0.01"],
    "split": ["--split", "--top-k", "1"],
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_streamed_checkpoint_equals_the_in_memory_path(tmp_path, demo, sparsify_cli, scheme):
    """Streaming a saved checkpoint writes exactly the tensors the in-memory executor makes."""
    from safetensors.torch import load_file

    src = tmp_path / "dense"
    demo("gpt2").save_pretrained(src)
    args = SCHEMES[scheme]
    code, out, err = sparsify_cli("upcycle", src, "--experts", "4", "--every", "1", *args, "-o", tmp_path / "streamed")
    assert code == 0, err
    options = dict(experts=4, every=1, granularity=2 if scheme == "granular" else 1,
                   shared_fraction=0.25 if scheme == "shared" else 0.0, drop_ratio=0.3 if scheme == "drop" else 0.0,
                   noise=0.01 if scheme == "drop" else 0.0, split=scheme == "split",
                   top_k=1 if scheme == "split" else 2)
    sparsify.save(sparsify.upcycle(str(src), **options), tmp_path / "memory")
    got = {k: v for f in sorted((tmp_path / "streamed").glob("model-*.safetensors")) for k, v in load_file(f).items()}
    want = {k: v for f in sorted((tmp_path / "memory").glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    back = sparsify.load(tmp_path / "streamed")
    assert compare(sparsify.load(tmp_path / "memory"), back).max_abs == 0.0


HF_FORMATS = {
    "mixtral granular": ("llama", "mixtral", ["--granularity", "2", "--every", "1"], "MixtralForCausalLM"),
    "qwen2-moe shared": ("qwen2", "qwen2-moe", ["--shared-fraction", "0.25"], "Qwen2MoeForCausalLM"),
    "qwen2-moe shared granular": ("qwen2", "qwen2-moe", ["--shared-fraction", "0.5", "--granularity", "2"],
                                  "Qwen2MoeForCausalLM"),
    "qwen3-moe granular": ("qwen3", "qwen2-moe", ["--granularity", "2"], "Qwen3MoeForCausalLM"),
    "switch drop": ("t5", "switch", ["--drop-ratio", "0.5"], "SwitchTransformersForConditionalGeneration"),
}


@pytest.mark.parametrize("case", list(HF_FORMATS))
def test_schemes_in_hugging_face_formats_load_in_transformers_and_verify(tmp_path, demo, sparsify_cli, case):
    import transformers

    name, fmt, args, cls = HF_FORMATS[case]
    out = tmp_path / "out"
    code, stdout, err = sparsify_cli("upcycle", f"demo:{name}", "--experts", "4", "--format", fmt, *args, "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "sparsify.json").read_text())
    assert manifest["format"] == fmt
    model = getattr(transformers, cls).from_pretrained(out).eval()
    if fmt == "switch":
        return  # switch routing and re-initialised neurons change the outputs: loading is the check here
    c = compare(demo(name), model)
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)
    code, stdout, err = sparsify_cli("verify", f"demo:{name}", out)
    assert code == 0 and "match" in stdout, stdout + err


def test_shared_expert_is_refused_by_formats_without_one(tmp_path, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "demo:llama", "--experts", "4", "--every", "1", "--shared-fraction", "0.25",
                                  "--format", "mixtral", "-o", tmp_path / "out")
    assert code != 0 and "no shared expert" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_round_trips_and_version_1_plans_still_load(demo):
    moe = sparsify.upcycle("demo:t5", experts=4, top_k=2, granularity=2, shared_fraction=0.5, drop_ratio=0.25)
    d = moe.sparsify_plan.to_dict()
    assert UpcyclePlan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    v1 = {"version": 1, "sites": d["sites"], "rejected": [], "selected": d["selected"],
          "moe": {"num_experts": 4, "top_k": 2}, "init": {"noise": 0.0, "router_init_std": 0.02, "seed": 3, "every": 2}}
    plan = UpcyclePlan.from_dict(v1)
    assert plan.seed == 3 and plan.selection["every"] == 2
    assert set(plan.layers) == set(d["selected"]) and plan.moe.num_experts == 4
    assert plan.why_not_preserving() is None
