"""Export-time stand-ins: each MoE layer becomes one custom op that ONNX export translates.

`SparseMoE` dispatches with data-dependent loops (argsort, bincount, per-expert segments) that
torch.export cannot trace with symbolic token counts. During export, `export_friendly(model)`
swaps every MoE layer for `ExportMoE`, which calls the custom op `sparsify::moe_ffn` on the same
tensors; `TRANSLATIONS` tells `torch.onnx.export` to write that op as the standard-ops MoE of
`sparsify.onnx.moe_graph`. The swap is undone on exit, so the caller's model is unchanged.

Hugging Face Mixtral and Qwen-MoE blocks (the HF formats sparsify writes) are swapped the same
way, so native and HF-format upcycled models export to the same graph.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import numpy as np
import onnx_ir as ir
import torch
import torch.nn as nn

from ..activations import PARAMETRISED, identify_activation
from ..errors import OptionError
from ..moe import Experts, MoEConfig, Router, SparseMoE

__all__ = ["ExportMoE", "export_friendly", "TRANSLATIONS", "moe_ffn_op"]


@torch.library.custom_op("sparsify::moe_ffn", mutates_args=())
def moe_ffn_op(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: Optional[torch.Tensor],
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    b3: Optional[torch.Tensor],
    top_k: int,
    router_kind: str,
    normalize: bool,
    capacity_factor: Optional[float],
    activation: str,
    router_dtype: str,
    act_params: list[torch.Tensor],
) -> torch.Tensor:
    """An MoE layer as one op (weights [E, out, in] as in `Experts`; a parametrised
    activation's parameters in `PARAMETRISED` order); eager runs `SparseMoE`."""
    e, i, h = w1.shape
    config = MoEConfig(num_experts=e, top_k=top_k, router=router_kind, normalize=normalize,
                       capacity_factor=capacity_factor, router_dtype=router_dtype)
    form = "dense" if w3 is None else "gated"
    names = PARAMETRISED[activation][1] if act_params else ()
    specs = {n: (tuple(t.shape), t.dtype, False) for n, t in zip(names, act_params or ())}
    experts = Experts(e, h, i, form=form, activation=activation, device="meta", act_params=specs)
    for name, t in dict(w1=w1, w2=w2, w3=w3, b1=b1, b2=b2, b3=b3).items():
        setattr(experts, name, None if t is None else nn.Parameter(t, requires_grad=False))
    for n, t in zip(names, act_params or ()):
        experts.act_params[n] = nn.Parameter(t, requires_grad=False)
    gate = Router(h, config)
    gate.weight = nn.Parameter(router, requires_grad=False)
    return SparseMoE(gate, experts).eval()(x).clone()


@moe_ffn_op.register_fake
def _(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(x)


def _translate(x, router, w1, w2, w3, b1, b2, b3, top_k, router_kind, normalize, capacity_factor,
               activation, router_dtype, act_params=None):
    """`sparsify::moe_ffn` in ONNX: the standard-ops MoE, weights moved to MatMul layout (the
    transposes are constant-folded into the initializers)."""
    from onnxscript import opset18 as op

    from .builder import const
    from .moe_graph import MoEGraphSpec, MoEWeights, emit_moe

    e, i, h = (int(d) for d in w1.shape)
    config = MoEConfig(num_experts=e, top_k=top_k, router=router_kind, normalize=normalize,
                       capacity_factor=capacity_factor, router_dtype=router_dtype)
    spec = MoEGraphSpec.from_config(config, activation, "dense" if w3 is None else "gated", h, x.dtype)

    def t(v):
        return None if v is None else op.Transpose(v, perm=[0, 2, 1])

    def u(v):
        return None if v is None else op.Unsqueeze(v, const(op, [1], "int64"))

    weights = MoEWeights(op.Transpose(router, perm=[1, 0]), t(w1), t(w2), t(w3), u(b1), u(b2), u(b3),
                         act_params=list(act_params) if act_params else None)
    return emit_moe(op, x, spec, weights)


# Giles (2010), "Approximating the erfinv function": single-precision polynomials in
# w = -log(1 - x^2), one for the centre (w < 5) and one in sqrt(w) for the tails.
_ERFINV_CENTRE = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                  -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def _erfinv(x):
    """erfinv, which ONNX has no operator for (Gemma 3n's activation sparsity takes a normal
    quantile): Giles' approximation, then one Newton step on Erf, which ONNX has; a few
    units in the last place of float32 on (-1, 1), +-inf at +-1 as torch gives."""
    from onnxscript import opset18 as op

    from .builder import const

    dtype = np.float32 if x.dtype is None or x.dtype.numpy() == np.float32 else x.dtype.numpy()

    def c(v):
        return const(op, v, dtype)

    w = op.Neg(op.Log(op.Mul(op.Sub(c(1.0), x), op.Add(c(1.0), x))))

    def horner(coefficients, t):
        p = c(coefficients[0])
        for a in coefficients[1:]:
            p = op.Add(c(a), op.Mul(p, t))
        return p

    centre = horner(_ERFINV_CENTRE, op.Sub(w, c(2.5)))
    tail = horner(_ERFINV_TAIL, op.Sub(op.Sqrt(w), c(3.0)))
    y = op.Mul(op.Where(op.Less(w, c(5.0)), centre, tail), x)
    # Newton: y -= (erf(y) - x) / (2 / sqrt(pi) * exp(-y^2))
    step = op.Div(op.Sub(op.Erf(y), x), op.Mul(c(2.0 / math.sqrt(math.pi)), op.Exp(op.Neg(op.Mul(y, y)))))
    refined = op.Sub(y, step)
    return op.Where(op.Equal(op.Abs(x), c(1.0)), op.Mul(x, c(np.inf)), refined)  # +-inf at +-1, as torch


def _histc(x, bins: int = 100, min: float = 0.0, max: float = 0.0):  # noqa: A002 (torch's names)
    """torch.histc: counts of `x` in `bins` equal bins over [min, max] (the last bin closed;
    values outside, and NaNs, not counted). With min == max (the default 0, 0) the range is the
    data's own, widened by 1 each way when all values are equal: transformers' grouped-matmul
    experts count tokens per expert so (onnxscript writes only fixed ranges). Each value's bin
    is the number of inner bin edges at or below it."""
    from onnxscript import opset18 as op

    from .builder import const

    dtype = np.float32 if x.dtype is None or x.dtype.numpy() == np.float32 else x.dtype.numpy()

    def c(v):
        return const(op, v, dtype)

    flat = op.Reshape(x, const(op, [-1], np.int64))
    if min == max:
        lo = op.ReduceMin(flat, keepdims=0)
        hi = op.ReduceMax(flat, keepdims=0)
        same = op.Equal(lo, hi)
        lo, hi = op.Where(same, op.Sub(lo, c(1.0)), lo), op.Where(same, op.Add(hi, c(1.0)), hi)
    else:
        lo, hi = c(float(min)), c(float(max))
    fractions = c([k / bins for k in range(1, bins)])  # inner edges at lo + (hi - lo) * k / bins
    edges = op.Add(lo, op.Mul(op.Sub(hi, lo), fractions))
    column = op.Unsqueeze(flat, const(op, [1], np.int64))
    index = op.ReduceSum(op.Cast(op.GreaterOrEqual(column, op.Unsqueeze(edges, const(op, [0], np.int64))),
                                 to=ir.DataType.INT64), const(op, [1], np.int64), keepdims=1)
    counted = op.And(op.And(op.GreaterOrEqual(column, lo), op.LessOrEqual(column, hi)), op.Not(op.IsNaN(column)))
    hits = op.And(op.Equal(index, op.Unsqueeze(const(op, list(range(bins)), np.int64), const(op, [0], np.int64))), counted)
    return op.ReduceSum(op.CastLike(hits, x), const(op, [0], np.int64), keepdims=0)


def _is_all_true(x):
    """aten._is_all_true, the reduction of a checked condition (SigLIP 2's `torch_compilable_check`
    on its patch grid): no element false (True for none, as torch)."""
    from onnxscript import INT64
    from onnxscript import opset18 as op

    false = op.ReduceSum(op.Cast(op.Not(x), to=INT64.dtype), keepdims=0)
    return op.Equal(false, op.Constant(value_int=0))


TRANSLATIONS = {torch.ops.sparsify.moe_ffn.default: _translate, torch.ops.prims.erf_inv.default: _erfinv,
                torch.ops.aten.erfinv.default: _erfinv, torch.ops.aten.histc.default: _histc,
                torch.ops.aten._is_all_true.default: _is_all_true}


class ExportMoE(nn.Module):
    """Stands in for an MoE layer during export: the same parameters under the same names,
    computed by the custom op. Build it with `from_sparse_moe` or `from_mixtral`."""

    def __init__(self, config: MoEConfig, activation: str, tensors, feature_axis: int = -1) -> None:
        super().__init__()
        self.config, self.activation, self._tensors = config, activation, tensors
        self.feature_axis = feature_axis

    @classmethod
    def from_sparse_moe(cls, moe: SparseMoE) -> "ExportMoE":
        """The stand-in of a sparsify `SparseMoE` (its shared expert, if any, stays a module of
        plain ops beside the custom op)."""
        e = moe.experts
        self = cls(moe.config, e.activation, lambda: (moe.router.weight, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3),
                   moe.feature_axis)
        if e.act_params is not None:
            self._act_params = lambda: [e.act_params[n] for n in PARAMETRISED[e.activation][1]]
        self.router, self.experts = moe.router, moe.experts  # keep parameter names
        if moe.shared is not None:  # the always-on shared expert, added with weight 1 as SparseMoE does
            self.shared = moe.shared
        return self

    @classmethod
    def from_hf_block(cls, block: nn.Module) -> "ExportMoE":
        """The stand-in of a transformers Mixtral, Qwen2-MoE or Qwen3-MoE block: softmax, top-k,
        renormalised unless `norm_topk_prob` is False; SwiGLU experts with gate and up stacked
        in `gate_up_proj` [E, 2I, H]; Qwen2-MoE's sigmoid-gated shared expert added on top."""
        experts, gate = block.experts, block.gate
        activation = identify_activation(experts.act_fn)
        if activation is None:
            raise ValueError(f"unrecognised expert activation {experts.act_fn!r}")
        normalize = bool(getattr(gate, "norm_topk_prob", True))
        config = MoEConfig(num_experts=experts.num_experts, top_k=gate.top_k, router="topk", normalize=normalize)
        i = experts.intermediate_dim

        def tensors():
            gu = experts.gate_up_proj
            return gate.weight, gu[:, :i], experts.down_proj, gu[:, i:], None, None, None

        self = cls(config, activation, tensors)
        self.gate, self.experts = gate, experts
        if getattr(block, "shared_expert", None) is not None:
            self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        return self

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self.config
        if self.feature_axis != -1:  # channels-first input (a 1x1 convolution FFN's)
            hidden_states = hidden_states.movedim(self.feature_axis, -1)
        act = getattr(self, "_act_params", None)
        out = moe_ffn_op(hidden_states, *self._tensors(), c.top_k, c.router, c.normalize,
                         c.capacity_factor, self.activation, c.router_dtype, act() if act else [])
        if self.feature_axis != -1:
            out = out.movedim(-1, self.feature_axis)
        shared = getattr(self, "shared_expert", None)
        if shared is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared(hidden_states)
        if getattr(self, "shared", None) is not None:
            out = out + self.shared(hidden_states)
        return out


# transformers MoE blocks with the routing and experts `from_hf_block` reproduces
_HF_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
# ... and those it does not, with the reason
_UNSUPPORTED = {
    "SwitchTransformersSparseMLP": "SwitchTransformers routing drops tokens past a fixed per-sequence capacity, "
    "which the exported MoE does not model; export the native upcycled directory instead",
}


def _stand_in(module: nn.Module) -> ExportMoE | None:
    if isinstance(module, SparseMoE):
        return ExportMoE.from_sparse_moe(module)
    kind = type(module).__name__
    if kind in _HF_BLOCKS:
        return ExportMoE.from_hf_block(module)
    if kind in _UNSUPPORTED:
        raise OptionError(f"cannot export {kind}: {_UNSUPPORTED[kind]}")
    return None


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[list[str]]:
    """Swap every MoE layer of `model` for its `ExportMoE` stand-in; yields the swapped module
    paths and restores the originals on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    paths: list[str] = []
    try:
        for path, module in list(model.named_modules()):
            new = _stand_in(module) if path else None  # the root cannot be swapped in place
            if new is None:
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, new)
            swapped.append((parent, name, module))
            paths.append(path)
        yield paths
    finally:
        for parent, name, module in reversed(swapped):
            setattr(parent, name, module)
