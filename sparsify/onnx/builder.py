"""One call style for emitting ONNX nodes, whoever records them.

The standard-ops MoE (`sparsify.onnx.moe_graph`) is written once as `op.MatMul(a, b)` calls.
Three recorders run it: onnxscript's opset module inside `torch.onnx.export` (the translation
of the export-time custom op), the onnxscript rewriter's context in `fuse-moe-ort`, and
`GraphBuilder` below, which records onto an onnx-ir tape for ONNX-native upcycling.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir

__all__ = ["GraphBuilder", "const"]

# Ops with more than one output that the emitters use; onnxscript's opset module knows these
# counts from the schemas, an onnx-ir tape has to be told.
_OUTPUTS = {"TopK": 2}


class GraphBuilder:
    """`op.<OpType>(*inputs, **attributes)` recorded onto an `onnx_ir.tape.Tape`.

    Nodes are not added to a graph; insert `builder.nodes` where they belong. `metadata` is
    copied onto every node (it names the site a subgraph came from).
    """

    def __init__(self, metadata: dict[str, str] | None = None) -> None:
        self.tape = ir.tape.Tape()
        self.metadata = dict(metadata or {})

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        """The nodes recorded so far, in order."""
        return tuple(self.tape.nodes)

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: ir.Value | None, _domain: str = "", **attributes: Any) -> Any:
            attributes = {k: v for k, v in attributes.items() if v is not None}
            n = _OUTPUTS.get(op_type, 1)
            meta = dict(self.metadata) or None
            if n == 1:
                return self.tape.op(op_type, list(inputs), attributes, domain=_domain, metadata_props=meta)
            return tuple(
                self.tape.op_multi_out(
                    op_type, list(inputs), attributes, num_outputs=n, domain=_domain, metadata_props=meta
                )
            )

        return make


def const(op: Any, value: Any, dtype: Any = None) -> Any:
    """A Constant node holding `value` (a number, list or array), in any recorder."""
    array = np.asarray(value, dtype=dtype)
    return op.Constant(value=ir.tensor(array))
