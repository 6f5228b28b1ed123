"""`sparsify export --onnx` and `sparsify upcycle model.onnx` from the command line, including
bad input: one-line errors, non-zero exit, nothing written."""

from __future__ import annotations

import json

import onnx
import pytest

from tests.onnx.helpers import count_ops, ffn_graph


def test_export_command_on_upcycled_directory(cli, tmp_path):
    import sparsify

    sparsify.save(sparsify.upcycle("demo:gpt2", experts=4), tmp_path / "gpt2-moe")
    out = tmp_path / "gpt2.onnx"
    r = cli("export", str(tmp_path / "gpt2-moe"), "--onnx", "-o", str(out), "--opset", "20")
    assert r.returncode == 0, r.stderr
    assert "transformer.h.1.mlp: fused into com.microsoft.MoE" in r.stdout
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == 20 and [o.name for o in proto.graph.output] == ["logits"]
    assert count_ops(proto, "MoE", "com.microsoft") == 2
    assert json.loads({p.key: p.value for p in proto.metadata_props}["sparsify"])["plan"]["layers"]["transformer.h.1.mlp"]["moe"]["num_experts"] == 4


def test_upcycle_command_on_onnx(cli, dense_onnx, tmp_path):
    out = tmp_path / "moe.onnx"
    r = cli("upcycle", str(dense_onnx("gpt2")["model"]), "--experts", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "transformer.h.1.mlp: fused into com.microsoft.MoE" in r.stdout
    assert "outputs equal the dense graph's" in r.stdout
    assert count_ops(out, "MoE", "com.microsoft") == 2


@pytest.mark.parametrize("case", ["not-onnx", "no-ffn", "export-opset", "input-opset"])
def test_bad_input(case, cli, tmp_path):
    src = tmp_path / "in.onnx"
    out = tmp_path / "out.onnx"
    if case == "not-onnx":
        src.write_bytes(b"\x00garbage, not protobuf")
        args, words = ("upcycle", str(src), "-e", "4", "-o", str(out)), "is not an ONNX model"
    elif case == "no-ffn":
        ffn_graph(src, "Sin")
        args, words = ("upcycle", str(src), "-e", "4", "-o", str(out)), "no FFN found"
    elif case == "export-opset":
        src.write_bytes(b"")
        args, words = ("export", "demo:llama", "--onnx", "-o", str(out), "--opset", "11"), "--opset 11 is not supported"
    else:
        ffn_graph(src, "Relu", opset=11)
        args, words = ("upcycle", str(src), "-e", "4", "-o", str(out)), "uses ONNX opset 11"
    r = cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    if case == "no-ffn":
        assert "activation (Sin)" in lines[0]
