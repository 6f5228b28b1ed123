"""The routing half of a standard-ops MoE layer, as `fuse-moe-ort` reads it: which Softmax is a
router, whether matched routing ops compute what `com.microsoft.MoE` computes, and why a router
that was not fused could not be.

A router's gates are `ScatterElements(zeros, TopK(probs).indices, weights)`. The zeros are written
as `ConstantOfShape(Shape(probs))`; with static shapes constant folding turns the `Shape` into a
constant and small zero tensors into initializers. Each form is accepted only when it is zeros of
exactly the probabilities' shape, so the fused operator computes what the standard ops did.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["routing_problem", "is_router", "unfused_reason", "is_float64", "FLOAT64_ROUTER"]

FLOAT64_ROUTER = "the router computes in float64; com.microsoft.MoE routes in the input's type"


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _std(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type == op_type


def _static_shape(value: ir.Value) -> list[int] | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _is_whole_shape_of(value: ir.Value | None, of: ir.Value) -> bool:
    node = None if value is None else value.producer()
    if not _std(node, "Shape") or node.inputs[0] is not of:
        return False
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
    rank = len(of.shape) if of.shape is not None else None
    return start == 0 and (end is None or (rank is not None and end >= rank))


def _zeros_problem(zeros: ir.Value, probs: ir.Value) -> str | None:
    """Why `zeros` is not a zero tensor of the shape of `probs`, or None."""
    node = zeros.producer()
    want = _static_shape(probs)
    if _std(node, "ConstantOfShape"):
        fill = node.attributes.get("value")
        if fill is not None and np.any(fill.as_tensor().numpy() != 0):
            return "the routing weights are scattered into a non-zero tensor"
        if _is_whole_shape_of(node.inputs[0], probs):
            return None
        shape = _ints(node.inputs[0])
        if shape is None or want is None or shape != want:
            return "the routing weights are scattered into a tensor not of the router probabilities' shape"
        return None
    tensor = ir.convenience.get_const_tensor(zeros)
    if tensor is None:
        return "the routing weights are not scattered into constant zeros"
    if np.any(tensor.numpy() != 0):
        return "the routing weights are scattered into a non-zero tensor"
    if want is None or [int(d) for d in tensor.shape] != want:
        return "the routing weights are scattered into a tensor not of the router probabilities' shape"
    return None


def routing_problem(probs: ir.Value, idx: ir.Value, zeros: ir.Value, sum_axes: ir.Value | None,
                    unsqueeze_axes: ir.Value, reduce_axes: ir.Value) -> str | None:
    """Why the matched ops do not compute softmax top-k routing and its weighted sum as the
    fused operator does (largest k, plain scatter into zeros, sums over the right axes), or None."""
    topk = idx.producer()
    scatter = next((u for u, _ in idx.uses() if _std(u, "ScatterElements")), None)
    if topk.attributes.get_int("largest", 1) != 1:
        return "TopK picks the smallest router probabilities"
    if scatter is None or scatter.attributes.get_string("reduction", "none") != "none":
        return "the routing weights are scattered with a reduction"
    why = _zeros_problem(zeros, probs)
    if why:
        return why
    if sum_axes is not None and _ints(sum_axes) not in ([-1], [1]):
        return "the top-k weights are not renormalised over the expert axis"
    if _ints(unsqueeze_axes) not in ([-1], [2]) or _ints(reduce_axes) != [0]:
        return "the expert outputs are not summed over the expert axis"
    return None


def is_float64(value: ir.Value | None) -> bool:
    """True when `value` is float64: a Cast to it, or typed so (a router weight whose Cast
    constant folding has applied)."""
    node = None if value is None else value.producer()
    if node is not None and node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.DOUBLE:
        return True
    return value is not None and value.dtype == ir.DataType.DOUBLE


def _users(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses()]


def is_router(node: ir.Node) -> bool:
    """A Softmax whose probabilities feed a TopK, directly (tokens choose) or transposed
    (experts choose): the router of a standard-ops MoE layer."""
    if not _std(node, "Softmax"):
        return False

    def feeds_topk(u: ir.Node) -> bool:
        if u.op_type == "Transpose":
            return any(v.op_type == "TopK" for v in _users(u.outputs[0]))
        return u.op_type == "TopK"

    return any(feeds_topk(u) for u in _users(node.outputs[0]))


def unfused_reason(softmax: ir.Node) -> str:
    """Why the layer of a router `fuse-moe-ort` left in the graph was not fused."""
    matmul = softmax.inputs[0].producer()
    if softmax.outputs[0].dtype == ir.DataType.DOUBLE or (
        matmul is not None and any(is_float64(v) for v in matmul.inputs)
    ):
        return FLOAT64_ROUTER
    topks = [u for u in _users(softmax.outputs[0]) if u.op_type == "TopK"]
    if not topks:
        return "expert-choice routing (experts pick tokens); com.microsoft.MoE routes tokens to experts"
    # the capacity form one-hot encodes the chosen experts (after a transpose) to queue them
    near = {w.op_type for t in topks for v in _users(t.outputs[1])
            for w in [v, *(x for o in v.outputs for x in _users(o))]}
    if "OneHot" in near:
        return "a capacity factor drops tokens; com.microsoft.MoE is dropless"
    return "the routing is not softmax, top-k and scatter as the fused operator computes it"
