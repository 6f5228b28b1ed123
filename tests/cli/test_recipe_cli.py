"""`sparsify upcycle --recipe FILE`: the Sparse Upcycling paper's T5 recipe end to end (upcycle a
saved tiny T5, load it, train it a few steps with the aux losses), flags that equal a recipe file
write identical outputs, flags beside a file replace its top level, and bad files fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsify
from sparsify.moe import SparseMoE
from tests.cli.test_bad_input import _assert_clean_failure

T5_RECIPE = Path(__file__).resolve().parents[2] / "examples" / "recipes" / "t5-sparse-upcycling.yaml"


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _plan(out: Path) -> dict:
    return json.loads((out / "sparsify.json").read_text())["plan"]


def test_the_papers_t5_recipe_upcycles_a_checkpoint_loads_and_trains(tmp_path, demo, sparsify_cli):
    dense = tmp_path / "t5"
    demo("t5").save_pretrained(dense)  # a T5 checkpoint saved from a tiny T5 config
    code, stdout, err = sparsify_cli("upcycle", dense, "--recipe", T5_RECIPE, "-o", tmp_path / "moe")
    assert code == 0, err
    assert "by streaming" in stdout and "per-layer settings" in stdout
    layers = _plan(tmp_path / "moe")["layers"]
    assert sorted(layers) == [f"{stack}.block.{i}.layer.{j}.DenseReluDense"
                              for stack, j in (("decoder", 2), ("encoder", 1)) for i in (1, 3)]
    for path, layer in layers.items():
        moe = layer["moe"]
        assert moe["num_experts"] == 32 and len(layer["experts"]) == 32
        want = ("expert-choice", 2.0, 1) if path.startswith("encoder") else ("topk", None, 2)
        assert (moe["router"], moe["capacity_factor"], moe["top_k"]) == want
    code, stdout, _ = sparsify_cli("inspect", tmp_path / "moe", "--json")
    assert code == 0
    shown = {(r["moe"]["num_experts"], r["moe"]["router"], r["moe"]["top_k"], r["moe"]["capacity_factor"])
             for r in json.loads(stdout)["sites"] if r["moe"] is not None}
    assert shown == {(32, "expert-choice", 1, 2.0), (32, "topk", 2, None)}

    model = sparsify.load(tmp_path / "moe").train()
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(input_ids=ids, labels=labels)
        aux = sparsify.aux_losses(model)
        assert aux.requires_grad and torch.isfinite(aux) and float(aux.detach()) > 0
        opt.zero_grad()
        (out.loss + aux).backward()
        assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in moes)
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.5, losses


# flags -> the same recipe as a file
EQUIVALENT = {
    "noise and seed": (["--experts", "4", "--top-k", "1", "--every", "1", "--noise", "0.01", "--seed", "3"],
                       "experts: 4\ntop_k: 1\nevery: 1\nnoise: 0.01\nseed: 3\n"),
    "switch with capacity on layers": (["--experts", "8", "--router", "switch", "--capacity-factor", "1.5",
                                        "--layers", "0,2"],
                                       "experts: 8\nrouter: switch\ncapacity_factor: 1.5\nlayers: [0, 2]\n"),
    "schemes": (["--experts", "4", "--granularity", "2", "--shared-fraction", "0.5", "--drop-ratio", "0.25",
                 "--no-normalize"],
                "experts: 4\ngranularity: 2\nshared_fraction: 0.5\ndrop_ratio: 0.25\nnormalize: false\n"),
}


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_flags_and_the_same_recipe_file_write_identical_outputs(tmp_path, sparsify_cli, case):
    flags, text = EQUIVALENT[case]
    (tmp_path / "moe.yaml").write_text(text)
    code, _, err = sparsify_cli("upcycle", "demo:t5", *flags, "-o", tmp_path / "flags")
    assert code == 0, err
    code, _, err = sparsify_cli("upcycle", "demo:t5", "--recipe", tmp_path / "moe.yaml", "-o", tmp_path / "file")
    assert code == 0, err
    a, b = _tensors(tmp_path / "flags"), _tensors(tmp_path / "file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = _plan(tmp_path / "flags"), _plan(tmp_path / "file")
    for key in ("sites", "selected", "selection", "layers", "seed", "recipe"):
        assert pa[key] == pb[key], key


def test_flags_beside_a_recipe_replace_its_top_level(tmp_path, sparsify_cli):
    code, _, err = sparsify_cli("upcycle", "demo:t5", "--recipe", T5_RECIPE, "--experts", "4", "--every", "1",
                                "-o", tmp_path / "out")
    assert code == 0, err
    plan = _plan(tmp_path / "out")
    assert len(plan["layers"]) == 8 and {v["moe"]["num_experts"] for v in plan["layers"].values()} == {4}
    assert {v["moe"]["router"] for p, v in plan["layers"].items() if p.startswith("encoder")} == {"expert-choice"}
    assert plan["recipe"]["experts"] == 4 and plan["recipe"]["every"] == 1 and plan["recipe"]["decoder"]["top_k"] == 2


def test_expert_choice_flag_is_accepted_when_the_recipe_routes_the_decoder_otherwise(tmp_path, sparsify_cli):
    (tmp_path / "moe.yaml").write_text("experts: 4\ndecoder:\n  router: topk\n")
    code, _, err = sparsify_cli("upcycle", "demo:t5", "--router", "expert-choice", "--recipe", tmp_path / "moe.yaml",
                                "-o", tmp_path / "out")
    assert code == 0, err
    routers = {p.split(".")[0]: v["moe"]["router"] for p, v in _plan(tmp_path / "out")["layers"].items()}
    assert routers == {"encoder": "expert-choice", "decoder": "topk"}
    code, out, err = sparsify_cli("upcycle", "demo:t5", "--experts", "4", "--router", "expert-choice",
                                  "-o", tmp_path / "refused")
    _assert_clean_failure(code, out, err, tmp_path, "--router expert-choice cannot be used on the causal",
                          out_name="refused")


BAD_FILES = {
    "unknown key": ("experts: 4\ntop_kk: 2\n", "moe.yaml:2: top_kk: unknown key (did you mean 'top_k'?)"),
    "bad value": ("experts: 4\ndecoder:\n  router: foo\n",
                  "moe.yaml:3: decoder.router: must be one of topk, switch, expert-choice, got 'foo'"),
    "bad type": ("experts: 4\nnoise: lots\n", "moe.yaml:2: noise: must be a number of at least 0, got 'lots'"),
    "unknown stack": ("experts: 4\nencodr:\n  top_k: 1\n", "moe.yaml:2: encodr: no FFN stack or module"),
    "layer out of range": ("experts: 4\nencoder:\n  9:\n    top_k: 1\n",
                           "moe.yaml:3: encoder.9: out of range: encoder.block has 4 FFNs"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_recipe_files_fail_with_one_line_and_write_nothing(tmp_path, sparsify_cli, case):
    text, says = BAD_FILES[case]
    (tmp_path / "moe.yaml").write_text(text)
    code, out, err = sparsify_cli("upcycle", "demo:t5", "--recipe", tmp_path / "moe.yaml", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, says.replace("moe.yaml", str(tmp_path / "moe.yaml")))


def test_experts_or_a_recipe_is_required(tmp_path, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "demo:t5", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "give the expert count (--experts N) or a recipe (--recipe FILE)")
