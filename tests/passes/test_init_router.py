"""`init-router`: routers from prompts, token embeddings and calibration k-means.

Rows are checked against the definition computed directly from the dense model; the streaming
executor (layer by layer from the checkpoint) writes the same router bytes as the in-memory one;
granular router groups repeat the rows and keep the model equal to the dense one.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sparsify
from sparsify.convert import convert
from sparsify.errors import OptionError, PassError
from sparsify.passes import FindFFN, InitRouter, PassContext, PassManager, SelectLayers, UpcycleFFN
from sparsify.prompts import ExpertPrompts
from sparsify.rewrite import apply_plan
from sparsify.verify import compare
from tests.finetunes import save_checkpoint, word_tokenizer

PROMPTS = [
    ExpertPrompts(["t10 t11 t12 t13", "t12 t14 t10"], ["t200 t201"]),
    ExpertPrompts(["t100 t101 t102 t103 t104"]),
    ExpertPrompts(["t300 t301", "t302 t303 t304 t305 t306 t307"], ["t10 t11"]),
    ExpertPrompts(["t400 t401 t402"]),
]
CALIBRATION = " ".join(f"t{(7 * i) % 500 + 3}" for i in range(600))


def _routers(moe):
    plan = moe.sparsify_plan
    return {s.path: moe.get_submodule(s.path).router.weight.detach() for s in plan.selected_sites}


@pytest.fixture
def llama_dir(tmp_path, demo):
    return save_checkpoint(demo("llama"), tmp_path / "llama")


@torch.no_grad()
def _site_states(model, paths, texts):
    """Every token's input to each module in `paths`, per text (plain hooks on the dense model)."""
    tokenizer = word_tokenizer()
    out = {p: [] for p in paths}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: out[p].append(a[0][0])) for p in paths]
    for text in texts:
        model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    for h in hooks:
        h.remove()
    return out


def test_prompt_rows_are_the_unit_mean_state_of_positives_less_negatives(llama_dir, demo):
    moe = sparsify.upcycle(str(llama_dir), experts=4, every=2, router_init="prompts", prompts=PROMPTS)
    plan = moe.sparsify_plan
    paths = [s.path for s in plan.selected_sites]
    for j, p in enumerate(PROMPTS):
        pos = _site_states(demo("llama"), paths, p.positive)
        neg = _site_states(demo("llama"), paths, p.negative) if p.negative else None
        for path in paths:
            row = torch.cat(pos[path]).double().mean(0)
            if neg:
                row -= torch.cat(neg[path]).double().mean(0)
            assert torch.allclose(_routers(moe)[path][j], F.normalize(row, dim=0).float(), atol=1e-6)
    data = plan.layer(paths[0]).router.data
    assert plan.layer(paths[0]).router.kind == "prompts" and data["experts"] == 4 and data["tokens"] == 27


def test_embedding_rows_are_the_unit_mean_token_embedding(demo):
    model = demo("llama")
    moe = sparsify.upcycle(model, experts=4, every=1, router_init="embeddings", prompts=PROMPTS, tokenizer=word_tokenizer())
    embed = demo("llama").get_input_embeddings().weight.detach().double()
    tok = word_tokenizer()

    def mean(texts):
        return embed[torch.tensor([i for t in texts for i in tok(t)["input_ids"]])].mean(0)

    want = torch.stack([mean(p.positive) - (mean(p.negative) if p.negative else 0) for p in PROMPTS])
    for rows in _routers(moe).values():
        assert torch.allclose(rows, F.normalize(want, dim=1).float(), atol=1e-6)


def test_kmeans_rows_are_unit_centroids_and_seeded(llama_dir, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION)
    a = _routers(sparsify.upcycle(str(llama_dir), experts=4, router_init="kmeans", calibration=text, seed=3))
    b = _routers(sparsify.upcycle(str(llama_dir), experts=4, router_init="kmeans", calibration=text, seed=3))
    c = _routers(sparsify.upcycle(str(llama_dir), experts=4, router_init="kmeans", calibration=text, seed=4))
    for path, rows in a.items():
        assert torch.allclose(rows.norm(dim=1), torch.ones(4))
        assert torch.equal(rows, b[path])  # the same seed, the same centroids
        assert (rows @ rows.t()).fill_diagonal_(0).abs().max() < 0.999  # four distinct directions
    assert any(not torch.equal(a[p], c[p]) for p in a)


@pytest.mark.parametrize("name,kind", [("llama", "prompts"), ("llama", "embeddings"), ("llama", "kmeans"), ("t5", "prompts"),
                                       ("t5", "kmeans"), ("bert", "prompts"), ("gpt2", "kmeans")])
def test_streamed_routers_equal_in_memory_routers(tmp_path, demo, name, kind):
    src = save_checkpoint(demo(name), tmp_path / name)
    (tmp_path / "cal.txt").write_text(CALIBRATION)
    data = {"prompts": PROMPTS} if kind != "kmeans" else {"calibration": tmp_path / "cal.txt"}
    r = convert(str(src), tmp_path / "out", experts=4, every=2, format="native", router_init=kind, **data)
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(f))
    memory = _routers(sparsify.upcycle(str(src), experts=4, every=2, router_init=kind, **data))
    assert set(memory) == {s.path for s in r.plan.selected_sites}
    for path, rows in memory.items():
        assert torch.equal(written[f"{path}.router.weight"], rows), path
    manifest = json.loads((tmp_path / "out" / "sparsify.json").read_text())
    router = manifest["plan"]["layers"][next(iter(memory))]["router"]
    assert router["kind"] == kind and router["data"]


def test_granular_groups_repeat_prompt_rows_and_keep_the_dense_function(llama_dir, demo):
    moe = sparsify.upcycle(str(llama_dir), experts=4, top_k=2, granularity=2, every=1, router_init="prompts",
                           prompts=PROMPTS[:2])
    for rows in _routers(moe).values():
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[2], rows[3]) and not torch.equal(rows[0], rows[2])
    assert moe.sparsify_plan.why_not_preserving() is None
    c = compare(demo("llama"), moe)
    assert c.max_abs <= 1e-5 * c.max_ref


def test_init_router_as_a_pass_between_planning_and_rewrite(demo):
    model = demo("llama")
    ctx = PassContext(model, plan=PassManager([FindFFN(), SelectLayers(every=2)]).run(model).plan)
    UpcycleFFN(experts=4).plan(ctx)  # layer plans with random routers
    InitRouter("prompts", prompts=PROMPTS, tokenizer=word_tokenizer())(ctx)
    assert set(ctx.plan.router_weights) == set(ctx.plan.selected)
    assert all(ctx.plan.layer(p).router.kind == "prompts" for p in ctx.plan.selected)
    apply_plan(model, ctx.plan)
    for p in ctx.plan.selected:
        assert torch.equal(model.get_submodule(p).router.weight, ctx.plan.router_weights[p])


def test_init_router_refuses_a_rewritten_model(demo):
    moe = sparsify.upcycle(demo("llama"), experts=4)
    with pytest.raises(PassError, match="before the rewrite"):
        PassManager([InitRouter("prompts", prompts=PROMPTS, tokenizer=word_tokenizer())]).run(moe, plan=moe.sparsify_plan)


@pytest.mark.parametrize("options,match", [
    (dict(router_init="prompts"), "needs prompts"),
    (dict(router_init="kmeans"), "needs calibration"),
    (dict(prompts=PROMPTS), "set router_init"),
    (dict(router_init="prompts", prompts=PROMPTS[:3]), "the prompts list 3 experts"),
    (dict(router_init="prompts", prompts=PROMPTS, granularity=2), "per router group"),
    (dict(router_init="prompts", prompts=[{"positive": []}]), "no positive prompts"),
    (dict(router_init="nope"), "router_init: must be one of"),
])
def test_bad_router_data_is_refused_before_any_work(options, match):
    with pytest.raises(OptionError, match=match):
        UpcycleFFN(experts=4, top_k=2, **options)


def test_prompts_need_a_tokenizer_for_a_model_without_checkpoint(demo):
    with pytest.raises(OptionError, match="needs a tokenizer"):
        sparsify.upcycle(demo("llama"), experts=4, router_init="prompts", prompts=PROMPTS)


def test_calibration_too_short_for_the_centroids(llama_dir, tmp_path):
    (tmp_path / "c.txt").write_text("t5 t6")
    with pytest.raises(OptionError, match="gives 2 tokens, fewer than the 4 centroids"):
        sparsify.upcycle(str(llama_dir), experts=4, router_init="kmeans", calibration=tmp_path / "c.txt")
