"""`sparsify inspect` and `sparsify verify` on ONNX files: sites and MoE layers from the graph's
metadata (or found in it), and the dense and upcycled graphs compared in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.onnx.helpers import ffn_graph, run


class _Run:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def cli(sparsify_cli):
    """The CLI in this process (no torch import per call): `cli(*args)` -> returncode, stdout, stderr."""
    return lambda *args: _Run(*sparsify_cli(*args))


def _json(cli, *args, code=0):
    r = cli(*map(str, args), "--json")
    assert r.returncode == code, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def gpt2_pair(dense_onnx, tmp_path_factory):
    """demo:gpt2 exported dense (standard ops), and that graph upcycled to 4 experts (fused)."""
    from sparsify.cli.main import main

    dense = dense_onnx("gpt2")["model"]
    moe = tmp_path_factory.mktemp("gpt2-onnx") / "moe.onnx"
    assert main(["upcycle", str(dense), "-e", "4", "-o", str(moe), "-q"]) == 0
    return dense, moe


def test_inspect_dense_and_upcycled_graphs(gpt2_pair, cli):
    dense, moe = gpt2_pair
    doc = _json(cli, "inspect", dense)
    assert doc["kind"] == "dense" and doc["format"] == "onnx" and len(doc["sites"]) == 4 and doc["selected"] == []
    assert {r["activation"] for r in doc["sites"]} == {"gelu_tanh"}
    r = cli("inspect", str(moe))
    doc = _json(cli, "inspect", moe)
    assert doc["kind"] == "upcycled" and doc["selected"] == ["transformer.h.1.mlp", "transformer.h.3.mlp"]
    assert doc["graph"]["fusion"]["fused"] == doc["selected"] and doc["graph"]["target"] == "ort"
    assert f"{moe}: upcycled, onnx format, 2 of 4 FFNs are MoE layers" in r.stdout
    assert "transformer.h.1.mlp: fused into com.microsoft.MoE" in r.stdout
    for line in r.stdout.splitlines():
        if "transformer.h.3.mlp" in line and "│" in line:
            assert "MoE: 4 experts, each an FFN" in line
    p = doc["parameters"]
    assert p["total"] > p["active_per_token"] > p["dense"]


def test_verify_graphs_in_onnx_runtime(gpt2_pair, cli, tmp_path):
    dense, moe = gpt2_pair
    r = cli("verify", str(dense), str(moe))
    doc = _json(cli, "verify", dense, moe)
    assert r.returncode == 0 and "match" in r.stdout and doc["runtime"] == "onnxruntime" and doc["match"]
    assert f"max abs diff {doc['max_abs']:.3e}" in r.stdout and doc["max_ref"] > 0
    noisy = tmp_path / "noisy.onnx"
    assert cli("upcycle", str(dense), "-e", "4", "--noise", "0.05", "-o", str(noisy), "-q").returncode == 0
    doc = _json(cli, "verify", dense, noisy, code=1)
    assert not doc["match"] and doc["max_abs"] > doc["tolerance"]


def test_verify_a_plain_ffn_graph_and_bad_pairs(tmp_path, cli):
    from sparsify.onnx.compare import compare_onnx, example_feeds
    from sparsify.formats.onnx import read_onnx

    dense = ffn_graph(tmp_path / "ffn.onnx", "Relu")
    moe = tmp_path / "ffn-moe.onnx"
    assert cli("upcycle", str(dense), "-e", "4", "--every", "1", "-o", str(moe), "-q").returncode == 0
    feeds = example_feeds(read_onnx(dense), seed=3)
    assert feeds["x"].shape == (2, 8) and feeds["x"].dtype == np.float32
    c = compare_onnx(dense, moe, seed=3)
    assert c.max_abs == float(np.abs(run(dense, feeds) - run(moe, feeds)).max()) and c.within()
    r = cli("verify", str(dense), "demo:gpt2")
    assert r.returncode != 0 and "two models or two ONNX graphs" in r.stderr and len(r.stderr.splitlines()) == 1
    other = ffn_graph(tmp_path / "other.onnx", "Relu")
    other.write_bytes(other.read_bytes().replace(b"\n\x01x", b"\n\x01z"))  # rename the input x -> z
    r = cli("verify", str(dense), str(other))
    assert r.returncode != 0 and "takes (x)" in r.stderr and "Traceback" not in r.stderr


def test_upcycle_onnx_dry_run(tmp_path, cli):
    dense = ffn_graph(tmp_path / "ffn.onnx", "Relu")
    doc = _json(cli, "upcycle", dense, "-e", "4", "--every", "1", "-o", tmp_path / "m.onnx", "--dry-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffn.onnx"]
    assert doc["dry_run"] and doc["selected"] and doc["bytes_written"] is None
    # at least 4 copies of the two 8x16 float matrices plus an 8x4 router
    assert doc["weight_bytes"] >= 4 * (2 * 8 * 16 * 4) + 8 * 4 * 4
    real = _json(cli, "upcycle", dense, "-e", "4", "--every", "1", "-o", tmp_path / "m.onnx")
    assert real["weight_bytes"] == doc["weight_bytes"] and real["bytes_written"] == (tmp_path / "m.onnx").stat().st_size
