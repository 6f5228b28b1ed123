"""The ONNX format: read a model file, write one or more graphs crash-safely.

    OUT.onnx              the graph (protobuf), checked by onnx.checker before it is kept
    OUT.onnx.data         its weights, only when they pass 2 GB (the protobuf limit)

Metadata key `sparsify` holds JSON: sparsify version, target, opset, the plan of an upcycled
model and what `fuse-moe-ort` fused. Every file is written beside its destination and renamed
into place only once all of them are complete and checked; a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from ..errors import OutputError, SourceError
from ..io.atomic import atomic_file, check_output

__all__ = ["read_onnx", "write_onnx", "needs_external_data", "EXTERNAL_DATA_THRESHOLD", "METADATA_KEY"]

METADATA_KEY = "sparsify"
# A protobuf message cannot pass 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)


def read_onnx(path: str | os.PathLike) -> ir.Model:
    """The ONNX model at `path`; a `SourceError` when it is missing or not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"no such ONNX file: '{path}'")
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf decode errors come in many types
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SourceError(f"'{path}' is not an ONNX model (cannot parse it: {detail})") from None
    if not len(model.graph) or not model.graph.outputs:
        raise SourceError(f"'{path}' is not an ONNX model with a graph (no nodes or no outputs)")
    return model


def needs_external_data(model: ir.Model) -> bool:
    """True when the weights do not fit in one protobuf with the graph."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return total > EXTERNAL_DATA_THRESHOLD


def write_onnx(models: dict[Path, ir.Model], force: bool = False) -> list[Path]:
    """Write each model to its path (weights to `PATH.data` when over 2 GB), check each with
    onnx.checker, and rename all into place together. Returns the files written."""
    outs = {Path(p): m for p, m in models.items()}
    data = {p: p.with_name(p.name + ".data") for p, m in outs.items() if needs_external_data(m)}
    for p in [*outs, *data.values()]:
        check_output(p, force)
    with contextlib.ExitStack() as stack:
        # Entered first, swapped last: the graphs appear only after their weights.
        tmp = {p: stack.enter_context(atomic_file(p, force)) for p in [*outs, *data.values()]}
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".sparsify-onnx-", dir=_parent(outs))))
        for p, model in outs.items():
            staged = work / p.name
            ir.save(model, staged, external_data=data[p].name if p in data else None)
            try:
                onnx.checker.check_model(str(staged))
            except onnx.checker.ValidationError as err:
                first = (str(err).strip().splitlines() or ["invalid"])[0][:200]
                message = f"the ONNX graph for '{p}' fails onnx.checker: {first}; nothing was written"
                raise OutputError(message) from None
            os.replace(staged, tmp[p])
            if p in data:
                os.replace(work / data[p].name, tmp[data[p]])
    return [*outs, *data.values()]


def _parent(outs: dict[Path, ir.Model]) -> Path:
    return next(iter(outs)).resolve().parent
