"""Numbers that must not pass silently: NaN/Inf source weights (refused by name unless allowed),
a dtype that a weight overflows (refused naming the tensor), what the summary's "equal" means for
the chosen dtype (and that verify then agrees), and verify's verdicts: its tolerance refused when
it makes no sense, whether DENSE is the recorded source, and whether a difference is what the
plan leads to."""

from __future__ import annotations

import json

import pytest
import torch

from sparsify.io.demo import build_demo
from tests.io.promises import assert_one_line_failure, temporaries


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A llama checkpoint, the same with one NaN, one with an Inf, one with a weight past float16."""
    root = tmp_path_factory.mktemp("numbers")
    build_demo("llama").save_pretrained(root / "dense")
    for name, value, layer in (("nan", float("nan"), 0), ("inf", float("-inf"), 3), ("big", 1e6, 1)):
        m = build_demo("llama")
        with torch.no_grad():
            m.model.layers[layer].mlp.up_proj.weight[0, 0] = value
        m.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("source, layer", [("nan", 0), ("inf", 3)])
def test_nonfinite_source_weights_are_refused_by_name(tmp_path, dense, sparsify_cli, source, layer):
    code, out, err = sparsify_cli("upcycle", dense / source, "--experts", "4", "-o", tmp_path / "out")
    line = assert_one_line_failure(code, out, err, f"model.layers.{layer}.mlp.up_proj.weight")
    assert "NaN or Inf" in line and "--allow-nonfinite" in line
    assert list(tmp_path.iterdir()) == [] and not temporaries(tmp_path)


def test_nonfinite_source_weights_convert_when_allowed_and_are_named(tmp_path, dense, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "--verbose", dense / "nan", "--experts", "4", "-o", tmp_path / "out",
                                  "--allow-nonfinite")
    assert code == 0, err
    assert "NaN or Inf, converted as they are: model.layers.0.mlp.up_proj.weight" in out
    import sparsify

    moe = sparsify.load(tmp_path / "out")
    assert torch.isnan(moe.model.layers[0].mlp.up_proj.weight).sum() == 1  # layer 0 stays dense (every 2)


@pytest.mark.parametrize("source", ["dense", "demo:llama"])  # streamed from a checkpoint, written from memory
def test_a_dtype_that_a_weight_overflows_is_refused_naming_it(tmp_path, dense, sparsify_cli, source):
    if source == "dense":
        src, tensor = dense / "big", "model.layers.1.mlp"
    else:
        m = build_demo("llama")
        with torch.no_grad():
            m.model.embed_tokens.weight[3, 3] = 7e4
        m.save_pretrained(tmp_path / "src")
        src, tensor = tmp_path / "src", "model.embed_tokens.weight"
    code, out, err = sparsify_cli("upcycle", src, "--experts", "4", "-o", tmp_path / "out", "--dtype", "float16")
    line = assert_one_line_failure(code, out, err, tensor)
    assert "float16" in line and "bfloat16 or float32" in line
    assert not (tmp_path / "out").exists() and not temporaries(tmp_path)
    # bfloat16 has float32's range: the same weights convert
    code, out, err = sparsify_cli("upcycle", src, "--experts", "4", "-o", tmp_path / "bf", "--dtype", "bfloat16")
    assert code == 0, err


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 5e-2), ("float16", 1e-2), (None, 1e-5)])
def test_the_summary_claim_holds_under_verify_for_each_dtype(tmp_path, dense, sparsify_cli, dtype, rtol):
    args = ["--dtype", dtype] if dtype else []
    code, out, err = sparsify_cli("upcycle", "--json", dense / "dense", "--experts", "4", "-o", tmp_path / "out", *args)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["preserves_outputs"] and doc["rtol"] == rtol and doc["dtype"] == dtype
    code, out, err = sparsify_cli("upcycle", "--verbose", dense / "dense", "--experts", "4", "-o", tmp_path / "o2", *args)
    claim = next(line for line in out.splitlines() if "outputs equal" in line)
    assert "not checked here" in claim and f"within {rtol:g} x" in claim
    assert (dtype is None) == ("rounding" not in claim)
    code, out, err = sparsify_cli("verify", "--json", dense / "dense", tmp_path / "out")
    doc = json.loads(out)
    assert code == 0 and doc["match"] and doc["rtol"] == rtol and doc["same_source"] is True, doc


@pytest.mark.parametrize("atol", ["-1", "nan", "inf", "-inf"])
def test_verify_refuses_a_tolerance_that_makes_no_sense(tmp_path, dense, sparsify_cli, atol):
    code, out, err = sparsify_cli("verify", "demo:llama", "demo:llama", "--atol", atol)
    assert_one_line_failure(code, out, err, "--atol must be a finite number at least 0")


@pytest.fixture(scope="module")
def outputs(dense, tmp_path_factory):
    """Outputs of the dense checkpoint: preserving, and with each option that changes the outputs."""
    from sparsify.cli.main import main

    root = tmp_path_factory.mktemp("verdicts")
    for name, options in VERDICTS.items():
        assert main(["upcycle", str(dense / "dense"), "--experts", "4", "-o", str(root / name), *options[0]]) == 0
    return root


# name -> (upcycle options, what verify's verdict names)
VERDICTS = {
    "switch": (["--router", "switch"], "switch"),
    "capacity": (["--capacity-factor", "0.5"], "capacity"),
    "noise": (["--noise", "0.5"], "noise"),
    "drop": (["--drop-ratio", "0.5"], "Drop-Upcycling"),
    "split": (["--split"], "parameter-neutral"),
}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_verify_says_a_difference_is_what_the_plan_leads_to(dense, outputs, sparsify_cli, name):
    code, out, err = sparsify_cli("verify", "--json", dense / "dense", outputs / name)
    doc = json.loads(out)
    assert code == 1 and not doc["match"], doc
    assert doc["explanation"].startswith("as its plan leads to") and VERDICTS[name][1] in doc["explanation"], doc
    assert doc["same_source"] is True


def test_verify_says_when_dense_is_not_the_recorded_source(dense, outputs, sparsify_cli):
    # same architecture, other weights: the outputs differ, and verify says why
    code, out, err = sparsify_cli("verify", "--json", dense / "big", outputs / "switch")
    doc = json.loads(out)
    assert code == 1 and doc["same_source"] is False and "not the recorded source" in doc["explanation"]


def test_verify_says_when_it_cannot_know_the_source(tmp_path, sparsify_cli):
    import sparsify

    sparsify.save(sparsify.upcycle(build_demo("llama"), experts=4), tmp_path / "out")  # from a module: no hashes
    code, out, err = sparsify_cli("verify", "--json", "demo:llama", tmp_path / "out")
    doc = json.loads(out)
    assert code == 0 and doc["same_source"] is None, doc


def test_no_bare_nan_in_sparsify_json(dense, outputs):
    for out in outputs.iterdir():
        json.loads((out / "sparsify.json").read_text(), parse_constant=lambda c: pytest.fail(f"{out}: bare {c}"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_check_finds_every_nan_and_inf(dtype):
    """`all_finite` (a min/max reduction, not a mask) agrees with `isfinite(t).all()` for a NaN or an
    Inf at the first, a middle and the last place of tensors whose lengths straddle the vector
    widths, in contiguous and transposed tensors; and for finite ones."""
    from sparsify.io.finite import all_finite

    torch.manual_seed(0)
    for n in [*range(1, 40), 63, 64, 65, 1023, 4099]:
        t = torch.randn(n).to(dtype)
        assert all_finite(t)
        for pos in {0, n // 2, n - 1}:
            for value in (float("nan"), float("inf"), float("-inf")):
                bad = t.clone()
                bad[pos] = value
                assert not all_finite(bad), (n, pos, value)
    square = torch.randn(37, 41).to(dtype)
    square[36, 40] = float("nan")
    assert not all_finite(square.t()) and all_finite(square[:36].t())
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_the_recorded_source_is_checked_by_the_hash_it_was_recorded_with(dense, algorithm):
    """Outputs record XXH3-128 fingerprints of their source's files; those written before record
    sha256. Either is checked by its own algorithm: the same files match, other weights do not."""
    import hashlib

    import xxhash

    from sparsify.io.sources import resolve_source
    from sparsify.provenance import check_source

    new = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}[algorithm]
    source = resolve_source(str(dense / "dense"))
    recorded = {"spec": "the dense llama", "kind": "dir",
                algorithm: {f.name: new(f.read_bytes()).hexdigest() for f in source.files}}
    same = check_source(recorded, source)
    assert same.same is True and algorithm in same.line
    other = check_source(recorded, resolve_source(str(dense / "big")))
    assert other.same is False and algorithm in other.line
