"""The ONNX writer: external data past the size limit, checker failures leave nothing behind."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import sparsify.formats.onnx as onnx_format
from sparsify.errors import OutputError
from sparsify.formats.onnx import read_onnx, write_onnx
from tests.onnx.helpers import ffn_graph, rel, run


def test_weights_go_to_external_data_past_the_limit(tmp_path, monkeypatch):
    src = ffn_graph(tmp_path / "ffn.onnx")
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_THRESHOLD", 100)  # bytes: the 2 GB rule, scaled down
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    files = write_onnx({out: read_onnx(src)})
    assert files == [out, out.with_name("big.onnx.data")] and all(f.is_file() for f in files)
    assert out.stat().st_size < 2000  # the graph alone; weights are in big.onnx.data
    x = {"x": np.ones((2, 8), np.float32)}
    assert rel(run(out, x), run(src, x)) == 0.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_checker_failure_writes_nothing(tmp_path):
    model = read_onnx(ffn_graph(tmp_path / "ffn.onnx"))
    node = next(iter(model.graph))
    model.graph.insert_after(node, ir.Node("", "NoSuchOp", [node.outputs[0]]))
    with pytest.raises(OutputError, match="fails onnx.checker"):
        write_onnx({tmp_path / "a.onnx": model, tmp_path / "b.onnx": read_onnx(tmp_path / "ffn.onnx")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffn.onnx"]
