"""Compare two ONNX graphs in ONNX Runtime on the same seeded inputs (`sparsify verify a.onnx b.onnx`).

The inputs are made from the reference graph's signature: token ids (int64 inputs read by an
embedding Gather) drawn below the embedding's row count, masks (int64 inputs named *mask*) all
ones, float inputs (an encoder's hidden states for a decoder graph) from a normal distribution.
Symbolic dimensions are the batch (the first) or the sequence (any other), so that inputs which
share a sequence agree on its length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import SourceError
from ..formats.onnx import read_onnx
from ..verify import Comparison

__all__ = ["compare_onnx", "example_feeds"]

_NUMPY = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.FLOAT: np.float32,
          ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64, ir.DataType.BOOL: np.bool_}


def example_feeds(model: ir.Model, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input of `model`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        dims = [] if value.shape is None else list(value.shape)
        shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(dims)]
        dtype = _NUMPY.get(value.dtype)
        if dtype is None:
            raise SourceError(f"cannot make example inputs for '{value.name}' of type {value.dtype}")
        if np.issubdtype(dtype, np.integer):
            rows = _embedding_rows(value)
            if "mask" in value.name or rows is None:
                feeds[value.name] = np.ones(shape, dtype)
            else:
                feeds[value.name] = rng.integers(0, rows, size=shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _embedding_rows(value: ir.Value) -> int | None:
    """The row count of the embedding table a token-id input indexes, if one does."""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            if table is not None and len(table.shape) >= 1:
                return int(table.shape[0])
    return None


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ONNX Runtime's warnings go to the terminal, not through Python
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime raises its own exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SourceError(f"ONNX Runtime cannot run '{path}': {first}") from None


def compare_onnx(reference: str | Path, candidate: str | Path, seed: int = 0, batch: int = 2, seq: int = 16) -> Comparison:
    """Run both graphs in ONNX Runtime (CPU) on the same inputs; compare their first outputs."""
    reference, candidate = Path(reference), Path(candidate)
    ref_model = read_onnx(reference)
    cand_model = read_onnx(candidate)
    ref_inputs = [v.name for v in ref_model.graph.inputs]
    cand_inputs = [v.name for v in cand_model.graph.inputs]
    if sorted(ref_inputs) != sorted(cand_inputs):
        raise SourceError(f"'{reference}' takes ({', '.join(ref_inputs)}) and '{candidate}' takes "
                          f"({', '.join(cand_inputs)}); compare graphs of the same model and role")
    feeds = example_feeds(ref_model, batch, seq, seed)
    del ref_model, cand_model
    ref = np.asarray(_session(reference).run(None, feeds)[0], np.float64)
    got = np.asarray(_session(candidate).run(None, feeds)[0], np.float64)
    max_ref = float(np.abs(ref).max()) if ref.size else 0.0
    if ref.shape != got.shape:
        return Comparison(float("inf"), max_ref, "the outputs have different shapes")
    return Comparison(float(np.abs(ref - got).max()) if ref.size else 0.0, max_ref)
