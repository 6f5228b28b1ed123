"""An MoE layer in standard ONNX ops: the portable form every ONNX runtime can execute.

    x2     = Reshape(x, [-1, H])                               tokens [T, H]
    gates  = route(Softmax(MatMul(x2, router)))                [T, E], zero where not routed
    y      = MatMul(act(MatMul(x2, w1) + b1) [* (MatMul(x2, w3) + b3)], w2) + b2   [E, T, H]
    out    = Reshape(ReduceSum(y * Unsqueeze(Transpose(gates), -1), axes=0), Shape(x))

Weights are in MatMul layout ([E, in, out]), biases [E, 1, out]. Every expert runs on every
token (E/k times the sparse work): the price of static shapes. `fuse-moe-ort` turns the
token-choice form into one `com.microsoft.MoE` node, which runs only the chosen experts.

Routing is the same as `sparsify.moe.Router` in eval mode: softmax in the router dtype, then
top-k (renormalised for `topk` with normalize), a capacity that drops pairs in GShard priority
order, or expert choice (each expert takes its top `capacity` tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ..moe.config import MoEConfig
from .builder import const

__all__ = ["MoEGraphSpec", "MoEWeights", "emit_moe", "emit_activation", "ONNX_ACTIVATIONS"]

_INT64 = np.int64


@dataclass(frozen=True)
class MoEGraphSpec:
    """What one emitted MoE subgraph computes (shapes, routing, expert FFN form)."""

    num_experts: int
    top_k: int
    router: str  # topk | switch | expert-choice
    normalize: bool
    capacity_factor: float | None
    activation: str
    form: str  # dense | gated
    hidden_size: int
    dtype: ir.DataType = ir.DataType.FLOAT  # of the hidden states and experts
    router_dtype: ir.DataType = ir.DataType.FLOAT

    @classmethod
    def from_config(
        cls, config: MoEConfig, activation: str, form: str, hidden_size: int, dtype: ir.DataType
    ) -> "MoEGraphSpec":
        """The spec of an MoE layer configured by `config`."""
        router_dtype = ir.DataType.DOUBLE if config.router_dtype == "float64" else ir.DataType.FLOAT
        return cls(config.num_experts, config.top_k, config.router, config.normalize, config.capacity_factor,
                   activation, form, hidden_size, dtype, router_dtype)


@dataclass
class MoEWeights:
    """Graph values holding one layer's tensors, in MatMul layout: router [H, E], w1 and w3
    [E, H, I], w2 [E, I, H], biases [E, 1, out]. w3/b3 only in the gated form."""

    router: Any
    w1: Any
    w2: Any
    w3: Any = None
    b1: Any = None
    b2: Any = None
    b3: Any = None
    act_params: list[Any] | None = None  # a parametrised activation's, in `PARAMETRISED` order


def emit_moe(op: Any, x: Any, spec: MoEGraphSpec, w: MoEWeights) -> Any:
    """Emit the MoE layer applied to hidden states `x` [..., H]; returns the output value."""
    x2 = op.Reshape(x, const(op, [-1, spec.hidden_size], _INT64))
    gates = _emit_gates(op, x2, spec, w.router)
    y = _emit_experts(op, x2, spec, w)
    combine = op.Unsqueeze(op.Transpose(gates, perm=[1, 0]), const(op, [-1], _INT64))
    out = op.ReduceSum(op.Mul(y, combine), const(op, [0], _INT64), keepdims=0)
    return op.Reshape(out, op.Shape(x))


def _emit_experts(op: Any, x2: Any, spec: MoEGraphSpec, w: MoEWeights) -> Any:
    h = op.MatMul(x2, w.w1)  # [T, H] @ [E, H, I] broadcasts to [E, T, I]
    if w.b1 is not None:
        h = op.Add(h, w.b1)
    a = emit_activation(op, spec.activation, h, spec.dtype, w.act_params)
    if spec.form == "gated":
        up = op.MatMul(x2, w.w3)
        if w.b3 is not None:
            up = op.Add(up, w.b3)
        a = op.Mul(a, up)
    y = op.MatMul(a, w.w2)
    return y if w.b2 is None else op.Add(y, w.b2)


def _zeros_like(op: Any, value: Any, dtype: ir.DataType) -> Any:
    return op.ConstantOfShape(op.Shape(value), value=ir.tensor(np.zeros(1, dtype=dtype.numpy())))


def _emit_gates(op: Any, x2: Any, spec: MoEGraphSpec, router: Any) -> Any:
    rdt = spec.router_dtype
    xr = x2 if spec.dtype == rdt else op.Cast(x2, to=rdt)
    if rdt != ir.DataType.FLOAT:  # router weights are stored in float32
        router = op.Cast(router, to=rdt)
    probs = op.Softmax(op.MatMul(xr, router), axis=-1)  # [T, E]
    if spec.router == "expert-choice":
        gates = _expert_choice(op, probs, spec)
    else:
        top, idx = op.TopK(probs, const(op, [spec.top_k], _INT64), axis=-1)
        if spec.router == "topk" and spec.normalize:
            top = op.Div(top, op.ReduceSum(top, const(op, [-1], _INT64), keepdims=1))
        if spec.capacity_factor is None:
            gates = op.ScatterElements(_zeros_like(op, probs, rdt), idx, top, axis=1)
        else:
            gates = _with_capacity(op, probs, top, idx, spec)
    return gates if spec.dtype == rdt else op.Cast(gates, to=spec.dtype)


def _capacity(op: Any, tokens: Any, spec: MoEGraphSpec) -> Any:
    # ceil(cf * t * k / e) evaluated in float64 in the same order as the Router does in Python
    f = np.float64
    c = op.Mul(op.Mul(const(op, [spec.capacity_factor], f), op.Cast(tokens, to=ir.DataType.DOUBLE)),
               const(op, [float(spec.top_k)], f))
    c = op.Ceil(op.Div(c, const(op, [float(spec.num_experts)], f)))
    return op.Cast(c, to=ir.DataType.INT64)


def _with_capacity(op: Any, probs: Any, top: Any, idx: Any, spec: MoEGraphSpec) -> Any:
    """Token choice with expert capacity: pairs are queued per expert in priority order (every
    token's first choice before any second choice) and those past the capacity are dropped."""
    e, k = spec.num_experts, spec.top_k
    tokens = op.Shape(probs, start=0, end=1)
    capacity = _capacity(op, tokens, spec)
    choice = op.OneHot(op.Transpose(idx, perm=[1, 0]), const(op, e, _INT64), const(op, [0, 1], _INT64), axis=-1)
    flat = op.Reshape(choice, const(op, [-1, e], _INT64))  # [k*T, E], pairs in priority order
    position = op.CumSum(flat, const(op, 0, _INT64), exclusive=1)  # place in the expert's queue
    keep = op.And(op.Less(position, capacity), op.Cast(flat, to=ir.DataType.BOOL))
    weight = op.Reshape(op.Transpose(top, perm=[1, 0]), const(op, [-1, 1], _INT64))
    kept = op.Mul(op.Cast(keep, to=spec.router_dtype), weight)
    return op.ReduceSum(op.Reshape(kept, const(op, [k, -1, e], _INT64)), const(op, [0], _INT64), keepdims=0)


def _expert_choice(op: Any, probs: Any, spec: MoEGraphSpec) -> Any:
    """Each expert takes its `min(T, max(1, ceil(cf * T * k / E)))` most probable tokens."""
    tokens = op.Shape(probs, start=0, end=1)
    capacity = op.Min(op.Max(_capacity(op, tokens, spec), const(op, [1], _INT64)), tokens)
    by_expert = op.Transpose(probs, perm=[1, 0])  # [E, T]
    top, idx = op.TopK(by_expert, capacity, axis=-1)
    gates = op.ScatterElements(_zeros_like(op, by_expert, spec.router_dtype), idx, top, axis=1)
    return op.Transpose(gates, perm=[1, 0])


def _gelu_tanh(op: Any, h: Any, c: Any) -> Any:
    inner = op.Mul(c(math.sqrt(2.0 / math.pi)), op.Add(h, op.Mul(c(0.044715), op.Mul(op.Mul(h, h), h))))
    return op.Mul(op.Mul(h, c(0.5)), op.Add(op.Tanh(inner), c(1.0)))


# How each activation of `sparsify.activations` is written in standard ops. Gelu is spelled out
# (Erf / Tanh formulas) because the Gelu operator only exists from opset 20.
ONNX_ACTIVATIONS = {
    "relu": lambda op, h, c: op.Relu(h),
    "gelu": lambda op, h, c: op.Mul(op.Mul(h, c(0.5)), op.Add(op.Erf(op.Div(h, c(math.sqrt(2.0)))), c(1.0))),
    "gelu_tanh": _gelu_tanh,
    "silu": lambda op, h, c: op.Mul(h, op.Sigmoid(h)),
    "quick_gelu": lambda op, h, c: op.Mul(h, op.Sigmoid(op.Mul(h, c(1.702)))),
    "sigmoid": lambda op, h, c: op.Sigmoid(h),
    "tanh": lambda op, h, c: op.Tanh(h),
    "relu2": lambda op, h, c: op.Mul(op.Relu(h), op.Relu(h)),
    "mish": lambda op, h, c: op.Mul(h, op.Tanh(op.Softplus(h))),
    "elu": lambda op, h, c: op.Elu(h, alpha=1.0),
    "leaky_relu": lambda op, h, c: op.LeakyRelu(h, alpha=0.01),
}


def _xielu(op: Any, h: Any, c: Any, alpha_p: Any, alpha_n: Any, beta: Any, eps: Any, dtype: ir.DataType) -> Any:
    """xIELU as `sparsify.activations` computes it: softplus of the raw parameters in their own
    dtype (rounded to it, as torch does for bfloat16 parameters), then everything in `dtype`."""

    def softplus(p: Any) -> Any:
        return op.CastLike(op.Softplus(op.Cast(p, to=ir.DataType.FLOAT)), p)

    to = lambda v: op.Cast(v, to=dtype)  # noqa: E731
    ap = to(softplus(alpha_p))
    an = op.Add(to(beta), to(softplus(alpha_n)))
    b = to(beta)
    positive = op.Add(op.Mul(op.Mul(ap, h), h), op.Mul(b, h))
    negative = op.Add(op.Mul(op.Sub(op.Sub(op.Exp(op.Min(h, to(eps))), c(1.0)), h), an), op.Mul(b, h))
    return op.Where(op.Greater(h, c(0.0)), positive, negative)


# Parametrised activations: (op, h, c, *parameters, dtype)
ONNX_PARAMETRISED = {"xielu": _xielu}


def emit_activation(op: Any, name: str, h: Any, dtype: ir.DataType, params: list[Any] | None = None) -> Any:
    """`name` (one of `sparsify.activations.ACTIVATIONS`, or of `PARAMETRISED` with its
    parameter values `params`) applied to `h`, in standard ops."""
    c = lambda v: const(op, v, dtype.numpy())  # noqa: E731
    if name in ONNX_PARAMETRISED:
        if not params:
            raise ValueError(f"activation {name!r} needs its parameters")
        return ONNX_PARAMETRISED[name](op, h, c, *params, dtype)
    try:
        fn = ONNX_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"no ONNX form for activation {name!r}") from None
    return fn(op, h, c)
