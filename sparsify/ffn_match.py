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

__all__ = ["Projection", "FFNMatch", "match_ffns", "TRANSPARENT"]

aten = torch.ops.aten

# Ops that do not change values (at inference): looked through between pattern pieces.
TRANSPARENT = VIEWS | {aten.dropout.default}
_MAX_ACTIVATION_NODES = 24


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


def _match_at(captured: Captured, w2: Projection) -> FFNMatch | None:
    between: list[Node] = []
    z = w2.input
    dropout = 0.0
    while _is(z, *TRANSPARENT):
        if z.target is aten.dropout.default:
            dropout = float(z.args[1])
        between.append(z)
        z = z.args[0]
    between.reverse()
    # gated: z = act(G(x)) * U(x)
    if _is(z, aten.mul.Tensor) and all(isinstance(a, Node) for a in z.args[:2]):
        for gate_side, up_side in ((z.args[0], z.args[1]), (z.args[1], z.args[0])):
            up_extra: list[Node] = []
            up = _find_projection_ending_at(captured, up_side, up_extra)
            if up is None:
                continue
            gate = _find_gate(captured, gate_side)
            if gate is None:
                continue
            g_proj, region = gate
            if not _pair(g_proj, up):
                continue
            act, act_params = _name_activation(captured, region, g_proj.output)
            front = [*g_proj.nodes, *region, *up.nodes, *up_extra, z]
            m = FFNMatch("gated", _through_views_back(g_proj.input, []), w2.output, g_proj, w2, up, act,
                         _ordered(front), between, dropout, act_nodes=region, activation_params=act_params)
            return _check(m)
    # dense: z = act(W1 x)
    g = _find_gate(captured, z)
    if g is None:
        return None
    w1, region = g
    if not region:
        return None  # two projections in a row: no nonlinearity, not an FFN
    act, act_params = _name_activation(captured, region, w1.output)
    m = FFNMatch("dense", _through_views_back(w1.input, []), w2.output, w1, w2, None, act,
                 _ordered([*w1.nodes, *region]), between, dropout, act_nodes=region, activation_params=act_params)
    return _check(m)


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
        m.problem = "the function between the projections is not a known activation"
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
