"""ONNX: export upcycled models, upcycle ONNX graphs directly, and the MoE in ONNX ops.

    from sparsify.onnx import export_onnx, upcycle_onnx
    export_onnx(model, "model.onnx", target="ort")          # com.microsoft.MoE where supported
    upcycle_onnx("dense.onnx", "moe.onnx", experts=8)       # ONNX in, ONNX out
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "export_onnx",
    "capture_graphs",
    "write_graphs",
    "capture_onnx",
    "lower_onnx",
    "ExportResult",
    "graph_paths",
    "upcycle_onnx",
    "OnnxUpcycleResult",
    "MoEGraphSpec",
    "MoEWeights",
    "emit_moe",
    "TARGETS",
    "OPSETS",
    "DEFAULT_OPSET",
]

_WHERE = {
    **dict.fromkeys(["export_onnx", "capture_graphs", "write_graphs", "capture_onnx", "lower_onnx", "ExportResult",
                     "graph_paths", "TARGETS", "OPSETS", "DEFAULT_OPSET"], "export"),
    **dict.fromkeys(["upcycle_onnx", "OnnxUpcycleResult"], "upcycle"),
    **dict.fromkeys(["MoEGraphSpec", "MoEWeights", "emit_moe"], "moe_graph"),
}


def __getattr__(name: str) -> Any:
    # Imported on first use: the ONNX passes import this package's builder and MoE graph, and
    # the exporter imports the passes, so eager imports here would be circular.
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
