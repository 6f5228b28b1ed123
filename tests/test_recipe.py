"""`sparsify.Recipe`: the keys, the precedence of sections, file errors that name the file, line and
key, and round trips between recipe objects, YAML files and a plan's `recipe`."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsify
from sparsify import PassManager, Recipe, passes
from sparsify.errors import OptionError, OutputError, RecipeError
from sparsify.moe.config import MoEConfig
from sparsify.plan import UpcyclePlan
from sparsify.recipe import LayerRecipe
from sparsify.recipe_keys import LAYER_KEYS

ROOT = Path(__file__).resolve().parents[1]
T5_RECIPE = ROOT / "examples" / "recipes" / "t5-sparse-upcycling.yaml"


@pytest.fixture(scope="module")
def t5_sites():
    from sparsify.io.demo import build_demo

    return PassManager([passes.FindFFN()]).run(build_demo("t5")).plan.sites


def test_layer_keys_are_every_option_of_a_layer():
    routing = {f.name for f in dataclasses.fields(MoEConfig)} - {"num_experts", "top_k", "router", "normalize",
                                                                 "capacity_factor"}
    layer = {f.name for f in dataclasses.fields(LayerRecipe)} - {"moe_options"}
    assert set(LAYER_KEYS) == layer | routing


def test_the_papers_t5_recipe_per_layer(t5_sites):
    recipe = Recipe.load(T5_RECIPE)
    selected, selection = recipe.select(t5_sites)
    assert [s.index for s in t5_sites if s.path in selected] == [1, 3, 1, 3]
    assert selection == {"every": 2, "layers": None}
    layers = recipe.layer_plans(t5_sites)
    for path, layer in layers.items():
        assert layer.moe.num_experts == 32 and len(layer.experts) == 32
        if path.startswith("encoder"):
            assert (layer.moe.router, layer.moe.capacity_factor, layer.moe.top_k) == ("expert-choice", 2.0, 1)
        else:
            assert (layer.moe.router, layer.moe.capacity_factor, layer.moe.top_k) == ("topk", None, 2)


def test_sections_replace_what_they_inherit_most_specific_last(t5_sites):
    recipe = Recipe({"experts": 8, "noise": 0.01, "decoder": {"top_k": 1, 3: {"experts": 4}},
                     "encoder.block": {"experts": 16, "layers": [0, 1, 2]},
                     "encoder.block.1.layer.1.DenseReluDense": {"top_k": 4}})
    got = {p: (r.config.num_experts, r.config.top_k, r.noise) for p, r in recipe.layer_recipes(t5_sites).items()}
    assert got == {
        "encoder.block.0.layer.1.DenseReluDense": (16, 2, 0.01),
        "encoder.block.1.layer.1.DenseReluDense": (16, 4, 0.01),
        "encoder.block.2.layer.1.DenseReluDense": (16, 2, 0.01),
        "decoder.block.1.layer.2.DenseReluDense": (8, 1, 0.01),
        "decoder.block.3.layer.2.DenseReluDense": (4, 1, 0.01),
    }
    assert recipe.select(t5_sites)[1]["stacks"] == {"encoder.block": {"layers": [0, 1, 2]},
                                                     "decoder.block": {"every": 2}}


def test_an_empty_layer_list_leaves_a_stack_dense(t5_sites):
    recipe = Recipe(experts=4, router="expert-choice", decoder={"layers": []})
    plans = recipe.layer_plans(t5_sites)
    assert plans and all(p.startswith("encoder") and layer.moe.router == "expert-choice" for p, layer in plans.items())


def test_options_beside_a_recipe_replace_its_top_level_only():
    recipe = Recipe.build(T5_RECIPE, experts=8, every=1, top_k=4)
    data = recipe.to_dict()
    assert data["experts"] == 8 and data["every"] == 1 and data["top_k"] == 4
    assert data["decoder"] == {"router": "topk", "top_k": 2}  # the section still wins for its stack
    assert Recipe.build(Recipe(every=2), layers=[1]).to_dict() == {"layers": [1]}  # every and layers replace each other


def test_format_defaults_fill_only_what_the_recipe_leaves_open():
    assert Recipe(experts=4).with_defaults({"every": 1}).to_dict() == {"experts": 4, "every": 1}
    assert Recipe(experts=4, layers=[1]).with_defaults({"every": 1}).to_dict() == {"experts": 4, "layers": [1]}
    # router and top_k go together: a recipe that sets either keeps its routing
    assert "router" not in Recipe(top_k=2).with_defaults({"router": "switch", "top_k": 1}).to_dict()


def test_python_errors_name_arguments_not_flags():
    with pytest.raises(RecipeError, match=r"^decoder\.router: must be one of topk, switch, expert-choice, got 'foo'$"):
        Recipe(decoder={"router": "foo"})
    with pytest.raises(RecipeError, match=r"^top_k must be between 1 and the expert count \(4\), got 5$"):
        Recipe(experts=4, top_k=5)
    with pytest.raises(RecipeError, match=r"unknown option 'expert' \(did you mean 'experts'\?\)"):
        Recipe(expert=4)
    with pytest.raises(RecipeError, match=r"^--top-k must be an integer of at least 1, got 0"):
        Recipe.build(None, flags=True, top_k=0)


def test_a_recipe_that_selects_must_agree_with_select_layers(demo):
    recipe = Recipe(experts=4, every=1)
    with pytest.raises(RecipeError, match="give the recipe to SelectLayers"):
        PassManager([passes.FindFFN(), passes.SelectLayers(every=2), passes.UpcycleFFN(recipe=recipe)]).run(demo("t5"))


def test_pass_manager_flow_with_a_recipe(demo):
    recipe = Recipe.load(T5_RECIPE)
    result = PassManager([passes.FindFFN(), passes.SelectLayers(recipe=recipe),
                          passes.UpcycleFFN(recipe=recipe)]).run(demo("t5"))
    routers = {p: layer.moe.router for p, layer in result.plan.layers.items()}
    assert sorted(set(routers.values())) == ["expert-choice", "topk"]
    assert Recipe(result.plan.recipe) == recipe


# --- recipe files ---------------------------------------------------------------------------

# name -> (file text, line, key, what the message says): refused on loading, before any model
LOAD_ERRORS = {
    "unknown key": ("experts: 32\nexpert: 4\n", 2, "expert", "unknown key (did you mean 'experts'?)"),
    "unknown key in a stack": ("experts: 8\ndecoder:\n  top_k: 2\n  rooter: topk\n", 4, "decoder.rooter",
                               "unknown key (did you mean 'router'?)"),
    "bad value": ("experts: 8\nencoder:\n  capacity_factor: 2\ndecoder:\n  router: foo\n", 5, "decoder.router",
                  "must be one of topk, switch, expert-choice, got 'foo'"),
    "bad type": ("experts: eight\n", 1, "experts", "must be an integer of at least 2, got 'eight'"),
    "bool for an integer": ("granularity: true\n", 1, "granularity", "must be an integer of at least 1, got true"),
    "number for a bool": ("encoder:\n  normalize: 1\n", 2, "encoder.normalize", "must be true or false, got 1"),
    "scalar for a list": ("layers: 3\n", 1, "layers", "must be a list of FFN indices"),
    "out of range number": ("drop_ratio: 1.5\n", 1, "drop_ratio", "must be a finite number in [0, 1], got 1.5"),
    "given twice": ("experts: 4\nexperts: 8\n", 2, "experts", "given twice"),
    "every and layers": ("every: 2\nlayers: [1]\n", 2, "layers", "give either every or layers, not both"),
    "selection per layer": ("decoder:\n  1:\n    every: 2\n", 3, "decoder.1.every",
                            "selection (every, layers) is set per stack"),
    "model key in a stack": ("decoder:\n  seed: 1\n", 2, "decoder.seed", "set it at the top level"),
    "layer index at the top": ("3:\n  top_k: 1\n", 1, "3", "a layer index belongs in a stack section"),
    "sections contradict": ("experts: 4\ndecoder:\n  top_k: 8\n", 2, "decoder",
                            "top_k must be between 1 and the expert count (4), got 8"),
    "merge_base type": ("merge_base: 3\n", 1, "merge_base", "must be a non-empty string"),
    "experts_from type": ("experts_from: [a, 2]\n", 1, "experts_from", "must be a non-empty list of checkpoint"),
    "prompts type": ("prompts: 5\n", 1, "prompts", "must be a prompts file path"),
    "calibration type": ("calibration: [a]\n", 1, "calibration", "must be a non-empty string"),
    "router_init value": ("router_init: hidden\n", 1, "router_init", "must be one of random, prompts, embeddings, kmeans"),
}
# the same, refused when the recipe meets the model's FFN sites (demo:t5)
SITE_ERRORS = {
    "unknown stack": ("experts: 4\nencodr:\n  top_k: 1\n", 2, "encodr",
                      "no FFN stack or module of this name in the model; its FFN stacks are encoder.block (encoder, "
                      "4 FFNs), decoder.block (decoder, 4 FFNs)"),
    "ambiguous stack": ("block:\n  top_k: 1\n", 1, "block", "names 2 FFN stacks"),
    "one stack twice": ("encoder:\n  top_k: 1\nencoder.block:\n  top_k: 2\n", 3, "encoder.block",
                        "as 'encoder' does"),
    "layer index out of range": ("decoder:\n  7:\n    top_k: 1\n", 2, "decoder.7",
                                 "out of range: decoder.block has 4 FFNs (numbered from 0)"),
    "stack layers out of range": ("decoder:\n  layers: [1, 9]\n", 2, "decoder.layers",
                                  "9 out of range: decoder.block has 4 FFNs"),
    "top layers out of range": ("layers: [1, 9]\n", 1, "layers", "9 out of range"),
    "layer not selected": ("decoder:\n  2:\n    top_k: 1\n", 2, "decoder.2", "is not selected (it selects 1, 3)"),
    "module not selected": ("encoder.block.0.layer.1.DenseReluDense:\n  top_k: 1\n", 1,
                            "encoder.block.0.layer.1.DenseReluDense", "is not selected"),
    "expert choice on the decoder": ("experts: 4\nrouter: expert-choice\n", 2, "router",
                                     "expert-choice cannot be used on the causal (decoder) layer"),
    "does not fit the FFN": ("decoder:\n  split: true\n  experts: 6\n  top_k: 1\n", 1, "decoder",
                             "do not split into 6 equal experts"),
}


@pytest.mark.parametrize("case", [*LOAD_ERRORS, *SITE_ERRORS])
def test_file_errors_name_the_file_line_and_key(tmp_path, t5_sites, case):
    text, line, key, says = LOAD_ERRORS.get(case) or SITE_ERRORS[case]
    path = tmp_path / "moe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        recipe = Recipe.load(path)
        assert case in SITE_ERRORS, "the recipe should have been refused on loading, before any model"
        recipe.layer_plans(t5_sites)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert says in message, message


def test_a_top_level_contradiction_points_at_the_key_it_names(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text("experts: 4\nnoise: 0.0\ntop_k: 8\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:3: top_k must be between 1 and the expert count (4), got 8")):
        Recipe.load(path)


@pytest.mark.parametrize("name,text,says", [
    ("moe.yaml", "experts: 4\n  top_k: 2\n", ":2: not valid YAML"),
    ("moe.yaml", "- 1\n- 2\n", ":1: a recipe is a mapping of keys to values, got a list"),
    ("moe.yaml", "", ": the recipe is empty"),
    ("moe.toml", "experts = 4\n", ": a recipe file is YAML or JSON"),
    ("moe.json", '{"experts": 4, "decoder": {"router": "nope"}}', ':1: decoder.router: must be one of'),
])
def test_unreadable_files_name_the_file(tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    assert str(caught.value).startswith(str(path)) and says in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match="no such recipe file"):
        Recipe.load(tmp_path / "missing.yaml")


# --- round trips ------------------------------------------------------------------------------

def test_recipe_file_and_sparsify_json_round_trip(tmp_path):
    recipe = Recipe.load(T5_RECIPE).with_options({"seed": 3, "noise": 0.01})
    recipe = Recipe({**recipe.to_dict(), "decoder": {"router": "topk", "top_k": 2, 3: {"experts": 16}}})
    again = Recipe.load(recipe.save(tmp_path / "again.yaml"))
    assert again == recipe and again.to_dict() == recipe.to_dict()
    with pytest.raises(OutputError, match="exists"):
        recipe.save(tmp_path / "again.yaml")  # an existing file is replaced only with force
    recipe.save(tmp_path / "again.yaml", force=True)

    moe = sparsify.upcycle("demo:t5", recipe=recipe)
    sparsify.save(moe, tmp_path / "moe")
    stored = json.loads((tmp_path / "moe" / "sparsify.json").read_text())["plan"]
    assert Recipe(stored["recipe"]) == recipe  # JSON holds the layer index 3 as "3"
    plan = UpcyclePlan.from_dict(stored)
    rebuilt = Recipe(plan.recipe).layer_plans(plan.sites)
    assert {p: layer.to_dict() for p, layer in rebuilt.items()} == stored["layers"]
    assert sparsify.load(tmp_path / "moe").sparsify_plan.recipe == stored["recipe"]


_layer_options = st.fixed_dictionaries({}, optional={
    "experts": st.sampled_from([4, 8]),
    "top_k": st.sampled_from([1, 2]),
    "noise": st.floats(0, 0.1),
    "capacity_factor": st.one_of(st.none(), st.floats(0.5, 4)),
    "drop_ratio": st.floats(0, 1),
    "normalize": st.booleans(),
    "router_init_std": st.floats(0, 1),
    "aux_loss_coef": st.floats(0, 1),
})
_recipes = st.fixed_dictionaries(
    {},
    optional={"seed": st.integers(0, 2**31), "every": st.integers(1, 4), "merge_base": st.just("average"),
              "encoder": st.builds(lambda o, layers: {**o, **layers}, _layer_options,
                                   st.dictionaries(st.integers(0, 3), _layer_options, max_size=2)),
              "decoder.block.1.layer.2.DenseReluDense": _layer_options},
).flatmap(lambda d: _layer_options.map(lambda top: {**top, **d}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_recipes)
def test_any_valid_recipe_round_trips_through_yaml_and_json(tmp_path, data):
    recipe = Recipe(data)
    assert Recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert Recipe(json.loads(json.dumps(recipe.to_dict(for_json=True)))) == recipe
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_recipes_in_the_readme_and_examples_load():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Recipes"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        assert Recipe(yaml.safe_load(block)).to_dict()
    assert T5_RECIPE.read_text() in text  # the README shows the shipped T5 recipe as it is
    for path in (ROOT / "examples" / "recipes").glob("*.yaml"):
        Recipe.load(path)


def test_a_layer_recipe_is_a_recipe_too(demo):
    layer = LayerRecipe.from_options(experts=4, top_k=1, noise=0.01)
    a = sparsify.upcycle(demo("gpt2"), recipe=layer, every=1)
    b = sparsify.upcycle(demo("gpt2"), experts=4, top_k=1, noise=0.01, every=1)
    assert a.sparsify_plan.to_dict() == b.sparsify_plan.to_dict()
    with pytest.raises(OptionError, match="recipe must be"):
        sparsify.upcycle(demo("gpt2"), recipe=42)
