"""The CLI round trip the input-kind tests share: `upcycle` a saved dense checkpoint with no
argument about its inputs, `sparsify.load` it and compare with the dense model, `verify` the
pair, `export --onnx` the output, and compare the ONNX graphs in ONNX Runtime with the model."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

import sparsify
from sparsify.onnx.signatures import graph_paths
from sparsify.verify import compare, main_output
from tests.coverage.check import run_onnx

__all__ = ["upcycle_verify_export", "graph_inputs", "onnx_rel"]


def upcycle_verify_export(sparsify_cli, dense, tmp_path: Path, experts: int = 4, static_if_refused: bool = False):
    """Run the round trip on the checkpoint saved at tmp_path/dense; returns (the loaded MoE, the
    ONNX path). With `static_if_refused`, an export refused as dynamic ("export with static
    shapes") is retried as the error says, with --static."""
    src, moe_dir, out = tmp_path / "dense", tmp_path / "moe", tmp_path / "moe.onnx"
    code, _, err = sparsify_cli("upcycle", src, "--experts", str(experts), "-o", moe_dir)
    assert code == 0, err
    moe = sparsify.load(moe_dir)
    c = compare(dense, moe)
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)
    code, stdout, _ = sparsify_cli("verify", src, moe_dir)
    assert code == 0 and "match" in stdout
    code, _, err = sparsify_cli("export", moe_dir, "--onnx", "-o", out)
    if code and static_if_refused and "export with static shapes (--static" in err:
        code, _, err = sparsify_cli("export", moe_dir, "--onnx", "--static", "--batch", "3", "--seq", "11", "-o", out)
    assert code == 0, err
    return moe, out


def graph_inputs(model, out: Path, role: str = "model") -> list[str]:
    """The input names of the exported graph of `role`."""
    return [i.name for i in onnx.load(str(graph_paths(model, out)[role])).graph.input]


def onnx_rel(model, out: Path, inputs: dict) -> float:
    """max |ONNX Runtime - model| / max |model| on `inputs`, on the model's main output."""
    with torch.no_grad():
        ref = main_output(model(**inputs)).float()
    got = torch.from_numpy(run_onnx(graph_paths(model, out), inputs)).float()
    assert got.shape == ref.shape
    return float((got - ref).abs().max() / ref.abs().max())
