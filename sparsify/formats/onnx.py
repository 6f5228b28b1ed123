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
from pathlib import Path, PurePath
from typing import Iterable, Iterator

import onnx
import onnx_ir as ir

from ..errors import OutputError, SourceError
from ..io.atomic import atomic_file, check_output, scratch_directory
from ..io.paths import regular_file

__all__ = ["read_onnx", "write_onnx", "external_files", "needs_external_data", "EXTERNAL_DATA_THRESHOLD", "METADATA_KEY"]

METADATA_KEY = "sparsify"
# A protobuf message cannot pass 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)


def read_onnx(path: str | os.PathLike) -> ir.Model:
    """The ONNX model at `path`; a `SourceError` when it is missing or not ONNX."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise SourceError(f"no such ONNX file: '{path}'")
    regular_file(path, "ONNX file")
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf decode errors come in many types
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SourceError(f"'{path}' is not an ONNX model (cannot parse it: {detail})") from None
    if not len(model.graph) or not model.graph.outputs:
        raise SourceError(f"'{path}' is not an ONNX model with a graph (no nodes or no outputs)")
    _check_external_data(model, path)
    return model


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in model.graphs():
        for v in graph.initializers.values():
            if v.const_value is not None:
                yield v.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value


def external_files(model: ir.Model) -> list[Path]:
    """The external data files the tensors of `model` are read from."""
    return sorted({Path(t.path) for t in _tensors(model) if isinstance(t, ir.ExternalTensor)})


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse, naming the file, external data that lies outside the model's directory, is
    missing, not a regular file, or shorter than the tensors it should hold (onnx_ir reads it
    lazily, so the damage would otherwise surface deep inside a pass)."""
    sizes: dict[Path, int] = {}
    for t in _tensors(model):
        if not isinstance(t, ir.ExternalTensor):
            continue
        location = PurePath(t.location)
        if location.is_absolute() or ".." in location.parts:
            raise SourceError(f"'{path}' reads tensor '{t.name}' from '{t.location}', outside its directory; "
                              "only external data beside the model is read")
        data = Path(t.path)
        if data not in sizes:
            if not (data.exists() or data.is_symlink()):
                raise SourceError(f"the external data file '{data}' of '{path}' is missing; "
                                  f"copy it beside the model (it holds tensor '{t.name}')")
            sizes[data] = regular_file(data, "external data file").st_size
        end = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        if (t.length is not None and t.length != t.nbytes) or end > sizes[data]:
            raise SourceError(f"the external data file '{data}' of '{path}' is truncated or corrupt "
                              f"(tensor '{t.name}' needs bytes up to {end}, the file has {sizes[data]})")


def needs_external_data(model: ir.Model) -> bool:
    """True when the weights do not fit in one protobuf with the graph."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return total > EXTERNAL_DATA_THRESHOLD


def write_onnx(models: dict[Path, ir.Model], force: bool = False, sources: Iterable = ()) -> list[Path]:
    """Write each model to its path (weights to `PATH.data` when over 2 GB), check each with
    onnx.checker, and rename all into place together. Returns the files written. `sources`:
    the paths the models were made from (with their external data files), never written over."""
    outs = {Path(p): m for p, m in models.items()}
    data = {p: p.with_name(p.name + ".data") for p, m in outs.items() if needs_external_data(m)}
    sources = [*sources, *(f for m in outs.values() for f in external_files(m))]
    for p in [*outs, *data.values()]:
        check_output(p, force, sources, kind="file")
    with contextlib.ExitStack() as stack:
        # Entered first, swapped last: the graphs appear only after their weights.
        tmp = {p: stack.enter_context(atomic_file(p, force, sources)) for p in [*outs, *data.values()]}
        work = stack.enter_context(scratch_directory(next(iter(outs))))
        for p, model in outs.items():
            staged = work / p.name
            try:
                ir.save(model, staged, external_data=data[p].name if p in data else None)
            except ir.serde.SerdeError as err:  # a graph read from a damaged file (names that are not text, ...)
                cause = err.__cause__ or err
                detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
                raise OutputError(f"the ONNX graph for '{p}' cannot be serialised ({detail}); the graph it was made "
                                  "from is damaged or edited; nothing was written") from None
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
