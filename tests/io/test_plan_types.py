"""Every number of a layer plan in sparsify.json, replaced by a value of the wrong kind, is a
one-line error when the output is read, never a model that fails later (in training or a
streamed forward) or one that silently differs."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

import sparsify
from sparsify.errors import SparsifyError


def _numbers(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, (*prefix, k))
    elif isinstance(node, list) and node:
        yield from _numbers(node[0], (*prefix, 0))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_types") / "moe"
    sparsify.save(sparsify.upcycle("demo:llama", experts=4, capacity_factor=2.0), out)
    return out


def _fields():
    model = sparsify.upcycle("demo:llama", experts=4, capacity_factor=2.0)
    layer = next(iter(model.sparsify_plan.to_dict()["layers"].values()))
    return list(_numbers(layer))


FIELDS = _fields()


def test_the_sweep_sees_the_numbers():
    assert {("moe", "num_experts"), ("moe", "top_k"), ("moe", "capacity_factor"), ("moe", "aux_loss_coef"),
            ("router", "std")} <= set(FIELDS)


WRONG = {"object": {"x": 1}, "string": "2", "null": None, "nan": float("nan")}
# null is valid for these two: dropless routing, the router's default k
CASES = [(path, kind) for path in FIELDS for kind in WRONG
         if not (kind == "null" and path[-1] in ("capacity_factor", "top_k"))]


@pytest.mark.parametrize("path,kind", CASES, ids=[f"{k}-{'.'.join(map(str, p))}" for p, k in CASES])
def test_a_plan_number_of_the_wrong_kind_is_one_line(output, tmp_path, path, kind):
    wrong = WRONG[kind]
    out = tmp_path / "moe"
    shutil.copytree(output, out)
    manifest = json.loads((out / "sparsify.json").read_text())
    changed = copy.deepcopy(manifest)
    for layer in changed["plan"]["layers"].values():
        node = layer
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = wrong
    (out / "sparsify.json").write_text(json.dumps(changed))
    with pytest.raises(SparsifyError) as err:
        sparsify.load(out)
    assert "\n" not in str(err.value) and "sparsify.json" in str(err.value)


# A site's fields, each replaced by a value a rewrite or a forward pass would trip on: the wrong
# kind, containers holding the wrong kind (the fuzz find: a list as a weight's name reached
# verify), numbers out of range, and the projections of another form.
SITE_CASES = {
    "weights: a list as a name": ("weights", lambda w: {**w, "w1": ["x"]}),
    "weights: an unknown role": ("weights", lambda w: {**w, "w9": "x"}),
    "weights: no w2": ("weights", lambda w: {k: v for k, v in w.items() if k != "w2"}),
    "weights: no w3 in a gated FFN": ("weights", lambda w: {k: v for k, v in w.items() if k != "w3"}),
    "form: unknown": ("form", lambda v: "sparse"),
    "layout: unknown": ("layout", lambda v: "conv9d"),
    "hidden_size: zero": ("hidden_size", lambda v: 0),
    "intermediate_size: negative": ("intermediate_size", lambda v: -4),
    "index: negative": ("index", lambda v: -1),
    "feature_axis: out of range": ("feature_axis", lambda v: 7),
    "dropout: one": ("dropout", lambda v: 1.0),
    "identities: a number": ("identities", lambda v: [3]),
    "calls: a string": ("calls", lambda v: ["1"]),
    "groups: zero": ("groups", lambda v: {"w1": 0}),
    "activation_params: an object": ("activation_params", lambda v: {"alpha": {"x": 1}}),
    "fused: a bad part": ("fused", lambda v: {"w1": [2, 2, "halves"]}),
    "overrides: a list": ("overrides", lambda v: ["x"]),
}


@pytest.mark.parametrize("case", list(SITE_CASES))
def test_a_site_field_that_cannot_be_read_is_one_line(output, tmp_path, case):
    field, wrong = SITE_CASES[case]
    out = tmp_path / "moe"
    shutil.copytree(output, out)
    manifest = json.loads((out / "sparsify.json").read_text())
    site = manifest["plan"]["sites"][0]
    site[field] = wrong(site.get(field))
    (out / "sparsify.json").write_text(json.dumps(manifest))
    with pytest.raises(SparsifyError) as err:
        sparsify.load(out)
    assert "\n" not in str(err.value) and "sparsify.json" in str(err.value) and field in str(err.value)
