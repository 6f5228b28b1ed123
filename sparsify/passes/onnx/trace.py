"""Trace a feed-forward block backwards from the value its output projection multiplies.

    dense:  a = act(x @ W1 [+ b1])
    gated:  a = act(x @ Wg [+ bg]) * (x @ Wu [+ bu])

Walking back from `a` through elementwise ops until projections (`MatMul` by a constant or by
the `Transpose` of one, `x @ W.T`, with an optional constant bias `Add`; in the gated form
gate and up may be the two parts of one fused projection, cut by `Split` or `Slice`: halves,
or every second column) recovers the projections and the activation subgraph however
it is spelled (`Relu`, `Gelu`, Gelu written out with `Erf` or `Tanh`, `x * Sigmoid(x)`, ...).
The activation is then named by evaluating that subgraph on probe values and comparing it with
`sparsify.activations` (`identify_activation`): what it does, not how it is written.

Both ONNX FFN discovery (weights [in, out]) and `fuse-moe-ort` (experts [E, in, out]) use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir
import torch

from ...activations import identify_activation

__all__ = ["Projection", "FFNTrace", "projection_at", "projection_of", "trace_ffn", "is_const", "name_activation",
           "through_ones"]

_UNARY = {
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu", "LeakyRelu", "Softplus",
    "Softsign", "Mish", "HardSigmoid", "HardSwish", "Swish", "Exp", "Log", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Identity", "Sin", "Cos", "ThresholdedRelu",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
_MAX_ACTIVATION_NODES = 24


def is_const(value: ir.Value | None) -> bool:
    """True for an initializer or the output of a Constant node."""
    return value is not None and ir.convenience.get_const_tensor(value) is not None


def _std(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


@dataclass
class Projection:
    """`output = input @ W + bias` by a constant W, as `MatMul` [+ `Add`] or as GPT-2's
    `Reshape` -> `Gemm` -> `Reshape`. `matrix()` is W in [in, out] layout whatever the op.
    `part` (index, parts, "halves" | "interleaved") is set for one part of a fused
    projection's output; `matrix()` and `bias_array()` are then that part's."""

    input: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    output: ir.Value
    nodes: list[ir.Node]
    transposed: bool = False  # Gemm with transB=1, or MatMul by Transpose(W): W is [out, in]
    part: tuple[int, int, str] | None = None

    def _cut(self, array: np.ndarray) -> np.ndarray:
        if self.part is None:
            return array
        index, parts, kind = self.part
        return array[..., index::parts] if kind == "interleaved" else np.split(array, parts, axis=-1)[index]

    def matrix(self) -> np.ndarray:
        """The weight as an array in [..., in, out] layout."""
        w = ir.convenience.get_const_tensor(self.weight).numpy()
        return self._cut(w.T if self.transposed else w)

    def bias_array(self) -> np.ndarray | None:
        """The bias as a vector (None without one)."""
        if self.bias is None:
            return None
        return self._cut(ir.convenience.get_const_tensor(self.bias).numpy().reshape(-1))


def _sole_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0][0] if len(uses) == 1 else None


def projection_at(core: ir.Node, rank: int) -> Projection | None:
    """The projection computed by a `MatMul` or `Gemm` node by a constant weight of `rank`
    dimensions, extended over its bias `Add` and (for `Gemm`) the reshapes around it."""
    if _std(core, "MatMul"):
        x, w = core.inputs
        nodes, transposed, bias = [core], False, None
        t = w.producer() if w is not None else None
        if rank == 2 and _std(t, "Transpose") and is_const(t.inputs[0]) and list(t.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            w, nodes, transposed = t.inputs[0], [t, core], True  # x @ W.T
    elif _std(core, "Gemm") and rank == 2:
        a = core.attributes
        if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
            return None
        flat, w = core.inputs[0], core.inputs[1]
        bias = core.inputs[2] if len(core.inputs) > 2 else None
        if not _std(flat.producer(), "Reshape") or (bias is not None and not is_const(bias)):
            return None
        x, nodes, transposed = flat.producer().inputs[0], [flat.producer(), core], bool(a.get_int("transB", 0))
    else:
        return None
    tensor = ir.convenience.get_const_tensor(w)
    if x is None or tensor is None or len(tensor.shape) != rank or is_const(x):
        return None
    out = core.outputs[0]
    user = _sole_user(out)
    if _std(core, "Gemm"):
        if not _std(user, "Reshape"):
            return None
        nodes.append(user)
        out = user.outputs[0]
    elif _std(user, "Add"):
        other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
        if is_const(other):
            bias, out = other, user.outputs[0]
            nodes.append(user)
    return Projection(x, w, bias, out, nodes, transposed)


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _last_axis(axis: int, value: ir.Value) -> bool:
    rank = len(value.shape) if value.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _part_of(value: ir.Value) -> tuple[ir.Value, tuple[int, int, str], ir.Node] | None:
    """(the cut value, part, the cutting node) when `value` is one of two equal parts of
    another value's last axis: an output of a two-way `Split`, or a `Slice` of one half or of
    every second column."""
    node = value.producer()
    if _std(node, "Split") and len(node.outputs) == 2:
        whole = node.inputs[0]
        sizes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        equal = sizes is None or (len(sizes) == 2 and sizes[0] == sizes[1])
        if equal and _last_axis(node.attributes.get_int("axis", 0), whole):
            return whole, (list(node.outputs).index(value), 2, "halves"), node
        return None
    if _std(node, "Slice") and len(node.inputs) >= 3:
        whole = node.inputs[0]
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or not _last_axis(axes[0], whole):
            return None
        return whole, (starts[0], ends[0], steps[0]), node  # checked against the width by the caller
    return None


def _fused_part(value: ir.Value, rank: int) -> Projection | None:
    """The part of a fused projection's output that `value` is, if it is one."""
    if rank != 2:
        return None
    cut = _part_of(value)
    if cut is None:
        return None
    whole, part, node = cut
    proj = projection_of(whole, rank)
    if proj is None or proj.part is not None:
        return None
    size = proj.matrix().shape[-1]
    if size % 2:
        return None
    if part[2] != "halves":  # a slice: (start, end, step)
        start, end, step = part
        end = min(end, size)
        if step == 1 and (start, end) in ((0, size // 2), (size // 2, size)):
            part = (start // (size // 2), 2, "halves")
        elif step == 2 and start in (0, 1) and end >= size - 1 + start:
            part = (start, 2, "interleaved")
        else:
            return None
    return Projection(proj.input, proj.weight, proj.bias, value, [*proj.nodes, node], proj.transposed, part)


def _is_one(value: ir.Value | None) -> bool:
    """True for a constant single 1 that broadcasting cannot widen (a scalar or a [1])."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1 or len(tensor.shape) > 1:  # checked before reading: a weight may be large
        return False
    return float(tensor.numpy().reshape(-1)[0]) == 1.0


def through_ones(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """`value` looked back through the ops that return their input (`Identity`, a product with
    or a quotient by the constant 1, as Falcon-H1 writes its default multipliers), and those
    ops in graph order. `x * 1` is `x` for every float, so a function of one is a function of
    the other: the same rule as the ATen matcher's `is_transparent`."""
    nodes: list[ir.Node] = []
    while True:
        node = value.producer()
        if _std(node, "Identity"):
            inner = node.inputs[0]
        elif _std(node, "Mul") and len(node.inputs) == 2 and _is_one(node.inputs[1]) != _is_one(node.inputs[0]):
            inner = node.inputs[0] if _is_one(node.inputs[1]) else node.inputs[1]
        elif _std(node, "Div") and len(node.inputs) == 2 and _is_one(node.inputs[1]) and not is_const(node.inputs[0]):
            inner = node.inputs[0]
        else:
            return value, nodes[::-1]
        if inner is None:
            return value, nodes[::-1]
        nodes.append(node)
        value = inner


def projection_of(value: ir.Value, rank: int) -> Projection | None:
    """The projection whose output is `value`, if it is one (or one part of a fused one), the
    products by 1 after it included (`through_ones`)."""
    inner, ones = through_ones(value)
    if ones:
        p = _projection_of(inner, rank)
        return None if p is None else replace(p, output=value, nodes=[*p.nodes, *ones])
    return _projection_of(value, rank)


def _projection_of(value: ir.Value, rank: int) -> Projection | None:
    fused = _fused_part(value, rank)
    if fused is not None:
        return fused
    node = value.producer()
    core = node
    if _std(node, "Add"):
        core = next((i.producer() for i in node.inputs if i is not None and not is_const(i)), None)
    elif _std(node, "Reshape"):
        core = node.inputs[0].producer() if node.inputs[0] is not None else None
    if core is None:
        return None
    p = projection_at(core, rank)
    return p if p is not None and p.output is value else None


@dataclass
class FFNTrace:
    """The inner part of an FFN: projections, activation subgraph and its name."""

    form: str  # dense | gated
    gate: Projection  # the first projection (the gate in the gated form)
    up: Projection | None
    activation: str
    act_input: ir.Value
    act_output: ir.Value
    nodes: list[ir.Node] = field(default_factory=list)  # every node from the projections to `a`

    @property
    def input(self) -> ir.Value:
        """The hidden states the FFN reads."""
        return self.gate.input


def _walk(start: ir.Value, rank: int) -> tuple[dict[ir.Value, Projection], list[ir.Node]] | None:
    """Projections reached from `start` through elementwise ops, and those ops; None when a
    non-elementwise op is met first (then `start` is not inside an FFN)."""
    roots: dict[ir.Value, Projection] = {}
    chain: list[ir.Node] = []
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = projection_of(v, rank)
        if p is not None:
            roots[v] = p
            continue
        node = v.producer()
        if node is None or not (_std(node, *_UNARY) or _std(node, *_BINARY)):
            return None
        if node not in chain:
            chain.append(node)
        if len(chain) > _MAX_ACTIVATION_NODES:
            return None
        stack.extend(i for i in node.inputs if i is not None and not is_const(i))
    return roots, chain


def trace_ffn(a: ir.Value, rank: int = 2) -> FFNTrace | str | None:
    """Trace the FFN whose output projection multiplies `a`.

    Returns an `FFNTrace`; a string saying why a candidate (an activation between projections
    of one input) cannot be used; or None when `a` does not come from an FFN at all.
    """
    walked = _walk(a, rank)
    if walked is None:
        return None
    roots, chain = walked
    if not roots or not chain or len(roots) > 2 or len({p.input for p in roots.values()}) != 1:
        return None
    if len(roots) == 1:
        (gate,) = roots.values()
        up, act_output, act_nodes = None, a, chain
    else:
        top = a.producer()
        if not _std(top, "Mul"):
            return f"two projections of one input are combined by {top.op_type}, not multiplied (not a gated FFN)"
        for gate_side, up_side in (top.inputs, reversed(top.inputs)):
            if up_side in roots and gate_side not in roots:
                sub = _walk(gate_side, rank)
                if sub is not None and len(sub[0]) == 1 and up_side not in sub[0]:
                    gate, up, act_output, act_nodes = sub[0][next(iter(sub[0]))], roots[up_side], gate_side, sub[1]
                    break
        else:
            return "two projections of one input are multiplied, but not as act(x @ Wg) * (x @ Wu)"
        if (gate.part is None) != (up.part is None) or (
                gate.part is not None and (gate.weight is not up.weight or gate.part[0] == up.part[0]
                                           or gate.part[1:] != up.part[1:])):
            return "gate and up are not the two parts of one fused projection"
    nodes = [n for p in (gate, up) if p is not None for n in p.nodes] + chain
    inside = set(nodes)
    for n in nodes:
        for out in n.outputs:
            if out is not a and (out.is_graph_output() or any(user not in inside for user, _ in out.uses())):
                return f"intermediate value '{out.name}' is also used outside the FFN"
    activation = name_activation(gate.output, act_output, act_nodes)
    if activation is None:
        ops = ", ".join(sorted({n.op_type for n in act_nodes}))
        return f"the activation ({ops}) is not one sparsify knows; see sparsify.activations"
    return FFNTrace("dense" if up is None else "gated", gate, up, activation, gate.output, act_output, nodes)


def name_activation(start: ir.Value, end: ir.Value, nodes: list[ir.Node]) -> str | None:
    """Name the elementwise function that `nodes` compute from `start` to `end`, by evaluating
    a float64 copy of them on probe values (see `sparsify.activations.identify_activation`)."""
    from onnx.reference import ReferenceEvaluator

    x = ir.val("x", dtype=ir.DataType.DOUBLE)
    mapping: dict[ir.Value, ir.Value] = {start: x}
    copies: list[ir.Node] = []
    for node in _topological(nodes):
        inputs = []
        for i in node.inputs:
            if i is None or i in mapping:
                inputs.append(mapping.get(i))
                continue
            constant = _double_constant(i)
            copies.append(constant)
            inputs.append(constant.outputs[0])
        copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                       num_outputs=len(node.outputs))
        copies.append(copy)
        mapping.update(zip(node.outputs, copy.outputs))
    if end not in mapping:
        return None
    out = mapping[end]
    out.name, out.dtype = "y", ir.DataType.DOUBLE
    model = ir.Model(ir.Graph([x], [out], nodes=copies, opset_imports={"": 20}), ir_version=10)
    try:
        session = ReferenceEvaluator(ir.to_proto(model))
    except Exception:  # an op the reference evaluator lacks: not an activation we can name
        return None

    def fn(t: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {"x": t.numpy().astype(np.float64)})
        return torch.from_numpy(np.asarray(y, dtype=np.float64))

    return identify_activation(fn)


def _double_constant(value: ir.Value) -> ir.Node:
    # probes run in float64 whatever the model's dtype, so float16 models are named as reliably
    array = ir.convenience.get_const_tensor(value).numpy()
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))])


def _topological(nodes: list[ir.Node]) -> list[ir.Node]:
    """`nodes` ordered so that producers come before their users."""
    inside = set(nodes)
    done: set[ir.Node] = set()
    order: list[ir.Node] = []

    def visit(n: ir.Node) -> None:
        if n in done:
            return
        done.add(n)
        for i in n.inputs:
            p = i.producer() if i is not None else None
            if p in inside:
                visit(p)
        order.append(n)

    for n in nodes:
        visit(n)
    return order
