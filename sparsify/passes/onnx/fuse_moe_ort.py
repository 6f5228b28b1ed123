"""`fuse-moe-ort`: each standard-ops MoE layer becomes one ONNX Runtime `com.microsoft.MoE` node.

The pattern is the token-choice MoE of `sparsify.onnx.moe_graph` (softmax router, top-k,
optional renormalisation, scatter of the k weights, every expert, weighted sum). The expert
FFN between the first and the output projection is traced and its activation named by value
(`sparsify.passes.onnx.trace`), so the rule does not depend on how the activation is spelled.
The routing is checked by `sparsify.passes.onnx.moe_routing`, which also accepts the forms a
static-shape export folds it into (the zeros the weights are scattered into, written as
`ConstantOfShape(Shape(probs))`, become `ConstantOfShape` of a constant shape, or an
initializer), each only when it is zeros of exactly the probabilities' shape.

What ONNX Runtime's CPU kernel computes, and so what can be fused (checked numerically):
router_probs are logits (it applies softmax itself), then top-k, then renormalises with
`normalize_routing_weights=1`; `activation_type` relu, gelu (the tanh approximation), silu,
and swiglu for gated SiLU experts with gate and up rows interleaved (`swiglu_fusion=1`);
fc1 [E, I, H] (or [E, 2I, H]), fc2 [E, H, I]. Expert choice, a capacity factor, a float64
router, erf-gelu and other gated activations stay as standard ops, and the report says why.
ONNX Runtime accepts a wrong weight layout silently, so the pass checks every fused node's
layout afterwards (`moe_layout_problem`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from ...onnx.builder import const
from .moe_routing import FLOAT64_ROUTER, is_float64, is_router, routing_problem, unfused_reason
from .trace import FFNTrace, trace_ffn

__all__ = ["FuseMoEOrt", "FusionReport", "moe_layout_problem", "site_of", "SITE_KEY", "ORT_DOMAIN"]

ORT_DOMAIN = "com.microsoft"
SITE_KEY = "sparsify.site"  # node metadata naming the layer a node belongs to
_DENSE = {"relu": "relu", "gelu_tanh": "gelu", "silu": "silu"}  # ours -> activation_type
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass
class FusionReport:
    """What `fuse-moe-ort` fused, and what it left as standard ops and why."""

    fused: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # site -> reason

    def lines(self) -> list[str]:
        """One line per MoE layer."""
        return [f"{s}: fused into com.microsoft.MoE" for s in self.fused] + [
            f"{s}: left as standard ops ({why})" for s, why in self.left.items()
        ]

    def to_dict(self) -> dict:
        """JSON form."""
        return {"fused": list(self.fused), "left": dict(self.left)}


def site_of(node: ir.Node) -> str:
    """The layer a node belongs to: its `sparsify.site` metadata, else its torch module scope,
    else its own name."""
    site = node.metadata_props.get(SITE_KEY)
    if site:
        return site
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            return str(ast.literal_eval(scopes)[-2])
        except (ValueError, SyntaxError, IndexError):
            pass
    return node.name or node.op_type


def _shape(value: ir.Value | None) -> tuple[int, ...] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


class _MoEFusion(pattern.RewriteRuleClassBase):
    """One variant of the rule: with or without renormalisation, with or without output bias."""

    def __init__(self, name: str, *, normalize: bool, out_bias: bool, report: FusionReport):
        super().__init__(name)
        self._normalize, self._out_bias, self._report = normalize, out_bias, report

    def pattern(self, op, x2, router, k, sum_axes, a, w2, b2, unsqueeze_axes, reduce_axes, out_shape, folded):
        xr = pattern.OrValue([op.Cast(x2, to=int(ir.DataType.FLOAT)), x2])
        probs = op.Softmax(op.MatMul(xr, router), axis=-1, _outputs=["probs"])
        top, idx = op.TopK(probs, k, axis=-1, _outputs=["top", "idx"])
        if self._normalize:
            top = op.Div(top, op.ReduceSum(top, sum_axes, keepdims=1))
        # With static shapes constant folding turns Shape(probs) into a constant, and small
        # zeros into an initializer: `folded` stands for either, and `check` verifies it is
        # zeros of exactly the probabilities' shape
        zeros = pattern.OrValue([op.ConstantOfShape(op.Shape(probs)), folded], name="zeros")
        gates = op.ScatterElements(zeros, idx, top, axis=1)
        gates = pattern.OrValue([op.Cast(gates), gates])
        combine = op.Unsqueeze(op.Transpose(gates, perm=[1, 0]), unsqueeze_axes)
        y = op.MatMul(a, w2)
        if self._out_bias:
            y = op.Add(y, b2)
        return op.Reshape(op.ReduceSum(op.Mul(y, combine), reduce_axes, keepdims=0), out_shape)

    def check(self, context, x2, router, k, a, w2, probs, idx, zeros, reduce_axes, unsqueeze_axes, b2=None,
              sum_axes=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        site = site_of(idx.producer())
        why = (routing_problem(probs, idx, zeros, sum_axes, unsqueeze_axes, reduce_axes)
               or self._why_not(x2, router, k, a, w2, b2))
        if why:
            self._report.left[site] = why
            return result.fail(why)
        self._site = site
        return result

    def _why_not(self, x2, router, k, a, w2, b2) -> str | None:
        if is_float64(router):
            return FLOAT64_ROUTER
        found = trace_ffn(a, rank=3)
        if not isinstance(found, FFNTrace):
            return found or "the expert FFN is not MatMul, activation, MatMul"
        if found.input is not x2:
            return "the experts do not read the router's input"
        dtype = ir.DataType(ir.convenience.get_const_tensor(found.gate.weight).dtype)
        if dtype not in _FLOATS:
            return f"the experts are {dtype.name.lower()}; com.microsoft.MoE takes float32 or float16"
        if len(a.uses()) != 1 or a.is_graph_output():
            return "the expert activation is also used outside the layer"
        g, u = found.gate, found.up
        dims = _expert_dims(router, k, g, u, w2, b2)
        if isinstance(dims, str):
            return dims
        if found.form == "gated" and found.activation != "silu":
            return f"gated {found.activation} experts: ONNX Runtime's CPU MoE only fuses gated SiLU (swiglu)"
        if found.form == "dense" and found.activation not in _DENSE:
            hint = " (its gelu is the tanh approximation)" if found.activation == "gelu" else ""
            return f"activation {found.activation} is not one com.microsoft.MoE implements{hint}"
        self._found, self._dims, self._dtype = found, dims, dtype
        return None

    def rewrite(self, op, x2, router, k, out_shape, w2, b2=None, **_):
        found, (e, h, i, top_k) = self._found, self._dims
        g, u = found.gate, found.up
        dtype = self._dtype
        logits = op.MatMul(x2 if dtype == ir.DataType.FLOAT else op.Cast(x2, to=ir.DataType.FLOAT), router)
        if dtype != ir.DataType.FLOAT:
            logits = op.Cast(logits, to=dtype)  # router_probs must have the input's type
        fc1 = g.matrix().transpose(0, 2, 1)  # [E, H, I] -> [E, I, H]
        b1 = None if g.bias is None else _array(g.bias).reshape(e, i)
        attrs = {"activation_type": _DENSE.get(found.activation, "")}
        if found.form == "gated":  # rows interleaved: gate_0, up_0, gate_1, up_1, ...
            up = u.matrix().transpose(0, 2, 1)
            fc1 = np.stack([fc1, up], axis=2).reshape(e, 2 * i, h)
            if g.bias is not None or u.bias is not None:
                zeros = np.zeros((e, i), dtype=fc1.dtype)
                b3 = zeros if u.bias is None else _array(u.bias).reshape(e, i)
                b1 = np.stack([zeros if b1 is None else b1, b3], axis=2).reshape(e, 2 * i)
            # alpha and beta spelled out: ONNX Runtime builds whose SwiGLU hard-codes other constants
            # (alpha 1.702, up + 1) do not know these attributes and refuse the model, not run it wrong
            attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
        fc2 = _array(w2).transpose(0, 2, 1)  # [E, I, H] -> [E, H, I]
        bias2 = None if b2 is None else const(op, _array(b2).reshape(e, h))
        moe = op.MoE(x2, logits, const(op, fc1), None if b1 is None else const(op, b1), const(op, fc2), bias2,
                     _domain=ORT_DOMAIN, k=top_k, normalize_routing_weights=int(self._normalize), **attrs)
        self._report.fused.append(self._site)
        self._report.left.pop(self._site, None)
        return op.Reshape(moe, out_shape)


def _array(value: ir.Value) -> np.ndarray:
    return ir.convenience.get_const_tensor(value).numpy()


def _expert_dims(router, k, g, u, w2, b2) -> tuple[int, int, int, int] | str:
    """(E, H, I, k) when every tensor has the layout the standard-ops MoE implies, else why not."""
    kt, r, w1 = ir.convenience.get_const_tensor(k), _shape(router), _shape(g.weight)
    if kt is None or r is None or w1 is None or _shape(w2) is None:
        return "the router, top-k or expert weights are not constants"
    e, h, i = w1
    expected = {"router": ((h, e), router), "w2": ((e, i, h), w2), "b1": ((e, 1, i), g.bias), "b2": ((e, 1, h), b2)}
    if u is not None:
        expected.update(w3=((e, h, i), u.weight), b3=((e, 1, i), u.bias))
    for role, (want, value) in expected.items():
        if value is not None and _shape(value) != want:
            return f"expert tensor {role} has shape {_shape(value)}, the layer implies {want}"
    top_k = int(np.asarray(kt.numpy()).reshape(-1)[0])
    return e, h, i, top_k


def moe_layout_problem(node: ir.Node) -> str | None:
    """Why a `com.microsoft.MoE` node's tensors do not have the layout ONNX Runtime reads
    (fc1 [E, f*I, H], fc2 [E, H, I], f = 2 for swiglu), or None when they do."""
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    fc1, fc2 = _shape(ins[2]), _shape(ins[4])
    if fc1 is None or fc2 is None or len(fc1) != 3 or len(fc2) != 3:
        return "expert weights are not constant 3-D tensors"
    e, h, i = fc2
    f = 2 if node.attributes.get_string("activation_type") == "swiglu" else 1
    if fc1 != (e, f * i, h):
        return f"fc1 has shape {fc1}, fc2 {fc2} implies {(e, f * i, h)}"
    for idx, want in ((3, (e, f * i)), (5, (e, h))):
        got = _shape(ins[idx])
        if ins[idx] is not None and got != want:
            return f"input {idx} has shape {got}, expected {want}"
    x = ins[0].shape if ins[0] is not None else None
    if x is not None and isinstance(x[-1], int) and x[-1] != h:
        return f"hidden size {x[-1]} differs from the experts' {h}"
    if not 1 <= node.attributes.get_int("k", 1) <= e:
        return f"k={node.attributes.get_int('k', 1)} is not between 1 and {e}"
    return None


class FuseMoEOrt(ir.passes.InPlacePass):
    """Rewrite every standard-ops MoE layer ONNX Runtime can run fused into one
    `com.microsoft.MoE` node; `self.report` says what was fused and what was left and why."""

    name = "fuse-moe-ort"

    def __init__(self) -> None:
        super().__init__()
        self.report = FusionReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = FusionReport()
        rules = pattern.RewriteRuleSet(
            [
                _MoEFusion.rule(f"moe-{'norm' if n else 'raw'}-{'bias' if b else 'nobias'}",
                                normalize=n, out_bias=b, report=self.report)
                for n in (True, False) for b in (True, False)
            ]
        )
        count = rules.apply_to_model(model)
        if count:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
            ir.passes.common.LiftConstantsToInitializersPass(size_limit=0)(model)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        self._explain_unfused(model)
        return ir.passes.PassResult(model, modified=bool(count))

    def _explain_unfused(self, model: ir.Model) -> None:
        """Name every router still in the graph and why its layer was not fused."""
        for node in model.graph:
            if is_router(node):
                site = site_of(node)
                if site not in self.report.left and site not in self.report.fused:
                    self.report.left[site] = unfused_reason(node)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "MoE" and node.domain == ORT_DOMAIN:
                problem = moe_layout_problem(node)
                if problem:
                    raise ir.passes.PostconditionError(f"fuse-moe-ort wrote a bad MoE node {node.name}: {problem}")
