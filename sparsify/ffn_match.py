"""Match the canonical FFN forms in an ATen graph.

    dense:  y = act(x @ W1.T + b1) @ W2.T + b2
    gated:  y = (act(x @ Wg.T) * (x @ Wu.T)) @ Wd.T

The projections are those of `sparsify.projections` (linear, GPT-2's Conv1D, matmul by a
parameter or its transpose, 1x1 convolutions); in the gated form gate and up may be the two
parts of one fused projection (halves or interleaved). The activation is whatever elementwise
subgraph leads from the first projection to the second; it is named by evaluating it (see
`sparsify.activations`). Views, clones and dropout between the pieces are looked through.
Matching knows nothing of module names; `sparsify.passes.find_ffn` maps matches to modules.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .activations import identify_activation, identify_parametrised
from .capture import Captured
from .projections import VIEWS, Projection, is_op, part_at, projection_at, through_views_back

__all__ = ["Projection", "FFNMatch", "match_ffns", "TRANSPARENT", "is_transparent", "constant_scale"]

aten = torch.ops.aten

# Ops that do not change values (at inference): looked through between pattern pieces.
TRANSPARENT = VIEWS | {aten.dropout.default}
_MAX_ACTIVATION_NODES = 24
_SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
# reductions over features, and the normalisations made of them: a function between the
# projections that computes one is no activation (elementwise) but mixes the intermediate features
_REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.var.correction,
               aten.var_mean.correction, aten.amax.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default,
               aten.rms_norm.default, aten.layer_norm.default, aten.group_norm.default}


def constant_scale(node: Node) -> float | None:
    """The constant c when `node` is `x * c` or `x / c` by a Python number (Falcon-H1's
    multipliers), as a factor; None for anything else."""
    if not is_op(node, *_SCALES) or len(node.args) != 2 or not isinstance(node.args[0], Node):
        return None
    c = node.args[1]
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        return 1.0 / c if c else None
    return float(c)


def is_transparent(node: Node) -> bool:
    """True for an op that returns its input's values (at inference): a view, a clone, a
    dropout, or a product with the constant 1 (`x * 1.0` is `x` for every float)."""
    if is_op(node, *TRANSPARENT):
        return True
    return constant_scale(node) == 1.0 and node.args[1] == 1


@dataclass
class FFNMatch:
    """A matched FFN: its input and output nodes, projections, activation and all its nodes."""

    form: str
    x: Node
    output: Node
    w1: Projection
    w2: Projection
    w3: Projection | None
    activation: str | None
    front: list[Node]  # nodes from x up to the activation (and gate product)
    between: list[Node]  # transparent nodes between the activation and the output projection
    dropout: float = 0.0
    problem: str | None = None  # set when the shape matched but something disqualifies it
    act_nodes: list[Node] = field(default_factory=list)  # the activation subgraph
    activation_params: dict[str, str] = field(default_factory=dict)  # parameter -> model tensor name

    @property
    def nodes(self) -> list[Node]:
        """Every node of the match, front to output projection."""
        return [*self.front, *self.between, *self.w2.nodes]

    @property
    def projections(self) -> dict[str, Projection]:
        """w1, w2 and (gated) w3 by role."""
        return {"w1": self.w1, "w2": self.w2, **({"w3": self.w3} if self.w3 is not None else {})}

    @property
    def key(self) -> tuple[str, ...]:
        """The weights it reads: equal keys are one FFN called more than once (shared weights)."""
        return tuple(p.weight for p in self.projections.values())


def _is(node: Node, *targets) -> bool:
    return is_op(node, *targets)


def _through_views_back(node: Node, out: list[Node]) -> Node:
    return through_views_back(node, out)


def _producer(captured: Captured, node: Node) -> Projection | None:
    """The projection, or part of a fused projection, whose output is exactly `node`."""
    for cand in (node, *node.all_input_nodes[:1]):
        proj = projection_at(captured, cand)
        if proj is not None and proj.output is node:
            return proj
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    if node.target is operator.getitem:  # getitem(chunk(out)) / getitem(split(out))
        if src.op != "call_function" or not src.args or not isinstance(src.args[0], Node):
            return None
        src = src.args[0]
    elif node.target is not aten.slice.Tensor:
        return None
    whole = _producer(captured, src)
    return part_at(whole, node) if whole is not None and whole.part is None else None


def _activation_region(captured: Captured, start: Node, root: Node) -> list[Node] | None:
    """Nodes computing `start` from `root` alone (plus constants and model tensors: the
    parameters of a parametrised activation), in graph order; None if `start` depends on
    anything else or the region is implausibly large for an activation."""
    region: dict[Node, None] = {}
    todo = [start]
    while todo:
        n = todo.pop()
        if n is root or n in region:
            continue
        if n.op == "placeholder" and captured.param_name(n) is not None:
            continue
        if n.op != "call_function" or len(region) >= _MAX_ACTIVATION_NODES:
            return None
        region[n] = None
        todo.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(region, key=order.__getitem__)


def _region_params(region: list[Node]) -> list[Node]:
    """The model tensors (placeholders) the region reads, in a stable order."""
    return list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a.op == "placeholder"))


def _region_fn(region: list[Node], root: Node, params: list[Node] = ()):
    """A callable `fn(x, tensors)` evaluating the region with `root` bound to `x` and the
    region's model tensors to `tensors`."""

    def fn(value: torch.Tensor, tensors=()) -> torch.Tensor:
        env: dict[Node, object] = {root: value, **dict(zip(params, tensors))}
        load = lambda a: env[a] if isinstance(a, Node) else a  # noqa: E731
        for n in region:
            args = torch.fx.node.map_aggregate(n.args, load)
            kwargs = torch.fx.node.map_aggregate(n.kwargs, load)
            if n.target is aten.dropout.default:
                env[n] = args[0]
            else:
                env[n] = n.target(*args, **kwargs)
        return env[region[-1]] if region else value

    return fn


def _name_activation(captured: Captured, region: list[Node], root: Node) -> tuple[str | None, dict[str, str]]:
    """The activation's name and, for a parametrised one, its parameters' model tensor names."""
    params = _region_params(region)
    fn = _region_fn(region, root, params)
    if not params:
        return identify_activation(fn), {}
    shapes = [tuple(int(d) for d in p.meta["val"].shape) if isinstance(p.meta.get("val"), torch.Tensor) else ()
              for p in params]
    found = identify_parametrised(fn, shapes)
    if found is None:
        return None, {}
    name, roles = found
    return name, {role: captured.param_name(p) for role, p in zip(roles, params)}


def _same_input(a: Node, b: Node) -> bool:
    return _through_views_back(a, []) is _through_views_back(b, [])


def _find_projection_ending_at(captured: Captured, node: Node, skipped: list[Node]) -> Projection | None:
    """A projection (or part of one) whose output is `node`, looking through trailing views."""
    probe = node
    while True:
        proj = _producer(captured, probe)
        if proj is not None:
            return proj
        if _is(probe, *VIEWS):
            skipped.append(probe)
            probe = probe.args[0]
            continue
        return None


def _pair(gate: Projection, up: Projection) -> bool:
    """Gate and up read the same input: two projections of it, or two parts of one."""
    if (gate.part is None) != (up.part is None):
        return False
    if gate.part is None:
        # one projection on both sides is no gate: x * sigmoid(1.702 x) (CLIP's quick_gelu, SiLU
        # spelt out) is an activation of a single projection, matched in the dense form
        return gate.output is not up.output and _same_input(gate.input, up.input)
    return (gate.weight == up.weight and gate.nodes[0] is up.nodes[0] and gate.part[0] != up.part[0]
            and gate.part[1:] == up.part[1:])


def _gated_at(captured: Captured, z: Node) -> tuple[Projection, Projection, list[Node], list[Node]] | None:
    """When `z` is act(G(x)) * U(x): the gate and up projections, the activation region and the
    views between up and the product; else None."""
    if not (_is(z, aten.mul.Tensor) and all(isinstance(a, Node) for a in z.args[:2])):
        return None
    for gate_side, up_side in ((z.args[0], z.args[1]), (z.args[1], z.args[0])):
        up_extra: list[Node] = []
        up = _find_projection_ending_at(captured, up_side, up_extra)
        if up is None:
            continue
        gate = _find_gate(captured, gate_side)
        if gate is None:
            continue
        g_proj, region = gate
        if _pair(g_proj, up):
            return g_proj, up, region, up_extra
    return None


def _gated_match(captured: Captured, z: Node, w2: Projection, between: list[Node], dropout: float) -> FFNMatch | None:
    gated = _gated_at(captured, z)
    if gated is None:
        return None
    g_proj, up, region, up_extra = gated
    act, act_params = _name_activation(captured, region, g_proj.output)
    front = [*g_proj.nodes, *region, *up.nodes, *up_extra, z]
    return FFNMatch("gated", _through_views_back(g_proj.input, []), w2.output, g_proj, w2, up, act,
                    _ordered(front), between, dropout, act_nodes=region, activation_params=act_params)


def _match_at(captured: Captured, w2: Projection) -> FFNMatch | None:
    between: list[Node] = []
    z = w2.input
    dropout = 0.0
    while is_transparent(z):
        if z.target is aten.dropout.default:
            dropout = float(z.args[1])
        between.append(z)
        z = z.args[0]
    between.reverse()
    # gated: z = act(G(x)) * U(x)
    m = _gated_match(captured, z, w2, between, dropout)
    if m is not None:
        return _check(m)
    # dense: z = act(W1 x)
    g = _find_gate(captured, z)
    if g is not None:
        w1, region = g
        if not region:
            return None  # two projections in a row: no nonlinearity, not an FFN
        act, act_params = _name_activation(captured, region, w1.output)
        m = FFNMatch("dense", _through_views_back(w1.input, []), w2.output, w1, w2, None, act,
                     _ordered([*w1.nodes, *region]), between, dropout, act_nodes=region,
                     activation_params=act_params)
        return _check(m)
    return _normalised_gated(captured, z, w2, between, dropout)


def _normalised_gated(captured: Captured, z: Node, w2: Projection, between: list[Node],
                      dropout: float) -> FFNMatch | None:
    """A gated FFN whose product passes through a function of it alone before the output
    projection (BitNet's and Dory's `ffn_sub_norm`, an RMSNorm over the intermediate features):
    matched so that it is rejected with its reason, never converted."""
    seen: set[Node] = set()
    todo = [z]
    while todo and len(seen) < _MAX_ACTIVATION_NODES:
        n = todo.pop(0)
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n is not z:
            m = _gated_match(captured, n, w2, between, dropout) or _loose_gated(captured, n, w2, between, dropout)
            if m is not None:
                region = _activation_region(captured, z, n)
                if region is None or any(projection_at(captured, r) is not None for r in region):
                    return None
                m.front = _ordered([*m.front, *region])
                m = _check(m)
                m.problem = _not_elementwise(region) or m.problem or \
                    "the gated product passes through a function of it before the output projection"
                return m
        todo.extend(n.all_input_nodes)
    return None


def _loose_gated(captured: Captured, z: Node, w2: Projection, between: list[Node], dropout: float) -> FFNMatch | None:
    """`z` = f(G(x)) * g(U(x)) with both sides elementwise functions of paired projections (Dory
    scales its up projection by a learned vector): only for naming why such an FFN is rejected."""
    if not (_is(z, aten.mul.Tensor) and all(isinstance(a, Node) for a in z.args[:2])):
        return None
    for gate_side, up_side in ((z.args[0], z.args[1]), (z.args[1], z.args[0])):
        gate, up = _find_gate(captured, gate_side), _find_gate(captured, up_side)
        if gate is None or up is None or not _pair(gate[0], up[0]):
            continue
        (g_proj, region), (u_proj, up_region) = gate, up
        act, act_params = _name_activation(captured, region, g_proj.output)
        front = [*g_proj.nodes, *region, *u_proj.nodes, *up_region, z]
        m = FFNMatch("gated", _through_views_back(g_proj.input, []), w2.output, g_proj, w2, u_proj, act,
                     _ordered(front), between, dropout, act_nodes=region, activation_params=act_params)
        if up_region:
            m.problem = "the up projection's output passes through a function of it before the gate product"
        return m
    return None


def _not_elementwise(region: list[Node]) -> str | None:
    """Why `region` is no activation when it reduces over values (a normalisation), else None."""
    reductions = [n for n in region if _is(n, *_REDUCTIONS)]
    if not reductions:
        return None
    return (f"the function between the projections is not elementwise: it reduces with {reductions[0].target} "
            "(a normalisation across the intermediate features), which experts that each hold part of those "
            "features cannot compute")


def _scaled_activation(region: list[Node]) -> str | None:
    """Why `region` is no known activation when it is a known one of its input scaled by a
    constant other than 1 (Falcon-H1's gate multiplier), else None."""
    c = constant_scale(region[0]) if region else None
    if c is None or c == 1.0:
        return None
    head, rest = region[0], region[1:]
    inside = {head, *rest}
    if any(a not in inside for n in rest for a in n.all_input_nodes):
        return None
    name = identify_activation(_region_fn(rest, head))
    if name is None:
        return None
    return (f"the activation ({name}) is applied to the projection's output scaled by the constant {c:g} (a "
            "multiplier in the FFN's forward), which sparsify's experts do not carry")


def _find_gate(captured: Captured, node: Node) -> tuple[Projection, list[Node]] | None:
    """Find a projection P (or part of one) such that `node` is an elementwise function of
    P's output alone."""
    seen: set[Node] = set()
    todo = [node]
    while todo and len(seen) < _MAX_ACTIVATION_NODES:
        n = todo.pop(0)
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        proj = _producer(captured, n)
        if proj is not None:
            region = _activation_region(captured, node, n)
            if region is not None:
                return proj, region
        todo.extend(n.all_input_nodes)
    return None


def _ordered(nodes: list[Node]) -> list[Node]:
    if not nodes:
        return nodes
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(dict.fromkeys(nodes), key=order.__getitem__)


def _check(m: FFNMatch) -> FFNMatch:
    h = m.w1.in_features
    kinds = {(p.layout, p.feature_axis) for p in m.projections.values()}
    if len(kinds) > 1:
        m.problem = "the projections are of different kinds (" + ", ".join(sorted(k for k, _ in kinds)) + ")"
    elif m.activation is None:
        m.problem = (_not_elementwise(m.act_nodes) or _scaled_activation(m.act_nodes)
                     or "the function between the projections is not a known activation")
    elif m.w2.out_features != h:
        m.problem = f"output projection maps to {m.w2.out_features} features, not back to the input's {h}"
    elif m.w2.in_features != m.w1.out_features or (m.w3 and m.w3.out_features != m.w1.out_features):
        m.problem = "projection sizes do not chain"
    else:
        inside = set(m.nodes)
        for n in m.nodes:
            if n is m.output:
                continue
            if any(u not in inside for u in n.users):
                m.problem = f"an intermediate value ({n.name}) is also used outside the FFN"
                break
    return m


def match_ffns(captured: Captured) -> list[FFNMatch]:
    """Every place in the graph shaped like an FFN, in graph order (problems recorded, not dropped)."""
    out = []
    for node in captured.graph.nodes:
        proj = projection_at(captured, node)
        if proj is None:
            continue
        m = _match_at(captured, proj)
        if m is not None:
            out.append(m)
    return out
