"""Shared helpers of the ONNX tests: ONNX Runtime sessions, op counts, relative differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from sparsify.moe import Experts, MoEConfig, Router, SparseMoE
from sparsify.onnx.builder import GraphBuilder
from sparsify.onnx.moe_graph import MoEGraphSpec, MoEWeights, emit_moe


def session(model: ir.Model | str | Path) -> ort.InferenceSession:
    """A CPU session of an in-memory model or a file."""
    data = ir.to_proto(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(model, feeds: dict) -> np.ndarray:
    """The first output of `model` on `feeds` (arrays or tensors)."""
    feeds = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
    return session(model).run(None, feeds)[0]


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference relative to the largest reference magnitude."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def count_ops(path_or_model, op_type: str, domain: str | None = None) -> int:
    """Nodes of `op_type` (in `domain`, if given) in the main graph."""
    proto = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    return sum(1 for n in proto.graph.node if n.op_type == op_type and (domain is None or n.domain == domain))


def random_moe(config: MoEConfig, form: str, activation: str, bias: bool, hidden: int = 16, inter: int = 24,
               seed: int = 0) -> SparseMoE:
    """A SparseMoE with distinct random experts and a router that spreads tokens."""
    g = torch.Generator().manual_seed(seed)
    experts = Experts(config.num_experts, hidden, inter, form=form, activation=activation, bias=(bias, bias, bias))
    router = Router(hidden, config)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
    return SparseMoE(router, experts).eval()


def graph_of(moe, batch: int | str = "batch", seq: int | str = "sequence") -> ir.Model:
    """The layer as a standalone ONNX model built with GraphBuilder: x [B, S, H] -> y, with
    dynamic axes by default, static ones where `batch` and `seq` are numbers."""
    e = moe.experts
    h = e.hidden_size
    x = ir.val("x", dtype=ir.DataType.FLOAT, shape=ir.Shape([batch, seq, h]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="moe")

    def init(name, t, layout):
        if t is None:
            return None
        arr = {"mm": lambda a: a.transpose(0, 2, 1), "bias": lambda a: a[:, None, :], "t": lambda a: a.T}[layout](
            t.detach().numpy()).copy()
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(arr))
        graph.register_initializer(v)
        return v

    weights = MoEWeights(init("router", moe.router.weight, "t"), init("w1", e.w1, "mm"), init("w2", e.w2, "mm"),
                         init("w3", e.w3, "mm"), init("b1", e.b1, "bias"), init("b2", e.b2, "bias"),
                         init("b3", e.b3, "bias"))
    op = GraphBuilder(metadata={"sparsify.site": "layer"})
    spec = MoEGraphSpec.from_config(moe.config, e.activation, e.form, h, ir.DataType.FLOAT)
    y = emit_moe(op, x, spec, weights)
    graph.extend(op.nodes)
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, x.shape
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def as_exported(model: ir.Model, fold_zeros: bool = False) -> ir.Model:
    """`model` as the exporter hands it to fusion: every value's shape inferred (static where
    the inputs are), then sparsify's clean-up (constant folding). With `fold_zeros`
    ConstantOfShape is folded too, into an initializer, as folders without onnxscript's
    exception for it (onnxsim, older onnxscript) write it."""
    import onnxscript.optimizer

    from sparsify.passes.onnx.cleanup import cleanup

    ir.passes.common.ShapeInferencePass()(model)
    if fold_zeros:
        onnxscript.optimizer.fold_constants(model, should_fold=lambda n: True if n.op_type == "ConstantOfShape" else None)
    cleanup()(model)
    return model


def ffn_graph(path: Path, activation: str = "Relu", opset: int = 18, leak: bool = False) -> Path:
    """A small ONNX file: x [N, 8] -> MatMul [8, 16] -> activation -> MatMul [16, 8] -> y.

    `activation` is an op type (Relu, Sin, Gelu, ...) or "erf-gelu" (the formula written out);
    with `leak` the hidden activation is a graph output too.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("fc1.weight", (8, 16)), ("fc2.weight", (16, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h"])]
    if activation == "erf-gelu":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                  (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5))]
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["h", "p"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["a"])]
    else:
        nodes.append(helper.make_node(activation, ["h"], ["a"]))
    nodes.append(helper.make_node("MatMul", ["a", "fc2.weight"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    if leak:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16]))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, path)
    return path
