"""`sparsify upcycle` then `sparsify verify` / `inspect` for every demo architecture."""

import json

import pytest

import sparsify
from sparsify.verify import compare
from tests.conftest import DEMO_NAMES


@pytest.mark.parametrize("name", DEMO_NAMES)
@pytest.mark.parametrize("extra", [[], ["--top-k", "1"], ["--every", "1"]], ids=["default", "top1", "every1"])
def test_upcycle_then_verify(tmp_path, sparsify_cli, name, extra):
    out = tmp_path / "moe"
    code, stdout, _ = sparsify_cli("upcycle", f"demo:{name}", "--experts", "8", "-o", out, *extra)
    assert code == 0
    assert "converted" in stdout and "FFNs into MoE layers" in stdout and "active per token" in stdout and str(out) in stdout
    code, stdout, _ = sparsify_cli("verify", f"demo:{name}", out)
    assert code == 0, stdout
    assert "max abs diff" in stdout and "match" in stdout
    loaded = sparsify.load(out)
    again = sparsify.upcycle(f"demo:{name}", experts=8, **({"top_k": 1} if "--top-k" in extra else {}),
                             **({"every": 1} if "--every" in extra else {}))
    c = compare(again, loaded)
    if json.loads((out / "sparsify.json").read_text())["format"] == "sparsify-native":
        assert c.max_abs == 0.0  # the same modules and weights: bit-identical
    else:  # auto chose a Hugging Face format (e.g. mixtral for every layer of a llama)
        assert c.max_abs < 1e-5 * c.max_ref


def test_switch_summary_says_not_preserving_and_verify_fails(tmp_path, sparsify_cli):
    out = tmp_path / "sw"
    code, stdout, _ = sparsify_cli("upcycle", "demo:t5", "--experts", "4", "--router", "switch", "-o", out)
    assert code == 0
    assert "differ from the dense model" in stdout and "p * FFN(x)" in stdout
    code, stdout, _ = sparsify_cli("verify", "demo:t5", out)
    assert code == 1 and "MISMATCH" in stdout
    layers = json.loads((out / "sparsify.json").read_text())["plan"]["layers"]
    assert {v["moe"]["top_k"] for v in layers.values()} == {1}


def test_no_normalize_summary(tmp_path, sparsify_cli):
    code, stdout, _ = sparsify_cli("upcycle", "demo:llama", "--experts", "4", "--no-normalize", "-o", tmp_path / "n")
    assert code == 0 and "do not sum to 1" in stdout


def test_inspect_dense_and_upcycled(tmp_path, sparsify_cli):
    code, stdout, _ = sparsify_cli("inspect", "demo:gpt2")
    assert code == 0 and "transformer.h.3.mlp" in stdout and "gelu_tanh" in stdout
    out = tmp_path / "m"
    sparsify_cli("upcycle", "demo:bert", "--experts", "4", "--layers", "0,2", "-o", out)
    code, stdout, _ = sparsify_cli("inspect", out)
    assert code == 0 and "2 of 4 FFNs are MoE" in stdout and "4 experts" in stdout


def test_force_replaces_existing_output(tmp_path, sparsify_cli):
    out = tmp_path / "o"
    assert sparsify_cli("upcycle", "demo:llama", "--experts", "2", "-o", out)[0] == 0
    first = (out / "sparsify.json").read_text()
    assert sparsify_cli("upcycle", "demo:llama", "--experts", "3", "-o", out, "--force")[0] == 0
    assert (out / "sparsify.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary leftovers
