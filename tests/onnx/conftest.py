"""Session fixtures of the ONNX tests: dense ONNX exports of the demo models (exported once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dense_onnx(tmp_path_factory):
    """`dense_onnx(name)` -> {role: path} of a dense standard-ops export of demo:NAME."""
    from sparsify.io.demo import build_demo
    from sparsify.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("dense-onnx")
    cache = {}

    def get(name):
        if name not in cache:
            result = export_onnx(build_demo(name), root / f"{name}.onnx", target="standard")
            cache[name] = {g.role: g.path for g in result.graphs}
        return cache[name]

    return get
