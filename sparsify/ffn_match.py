"""Match the two canonical FFN forms in an ATen graph.

    dense:  y = act(x @ W1.T + b1) @ W2.T + b2
    gated:  y = (act(x @ Wg.T) * (x @ Wu.T)) @ Wd.T

A projection is any of `aten.linear`, `aten.addmm` between views (GPT-2's Conv1D, weight
[in, out]) or `aten.matmul` with a parameter. The activation is whatever elementwise subgraph
leads from the first projection to the second; it is named by evaluating it (see
`sparsify.activations`). Views, clones and dropout between the pieces are looked through.
Matching knows nothing of module names; `sparsify.passes.find_ffn` maps matches to modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .activations import identify_activation
from .capture import Captured

__all__ = ["Projection", "FFNMatch", "match_ffns", "TRANSPARENT"]

aten = torch.ops.aten

# Ops that do not change values (at inference): looked through between pattern pieces.
TRANSPARENT = {
    aten.dropout.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
}
_VIEWS = TRANSPARENT - {aten.dropout.default}
_MAX_ACTIVATION_NODES = 24


@dataclass
class Projection:
    """A linear map by a model parameter: input node, weight/bias names, layout, its nodes."""

    input: Node
    output: Node
    weight: str
    bias: str | None
    layout: str  # "linear" ([out, in]) or "conv1d" ([in, out])
    in_features: int
    out_features: int
    nodes: list[Node] = field(default_factory=list)


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

    @property
    def nodes(self) -> list[Node]:
        """Every node of the match, front to output projection."""
        return [*self.front, *self.between, *self.w2.nodes]


def _is(node: Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _param(captured: Captured, node: Node) -> str | None:
    return captured.param_name(node) if isinstance(node, Node) and node.op == "placeholder" else None


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _through_views_back(node: Node, out: list[Node]) -> Node:
    while _is(node, *_VIEWS) and isinstance(node.args[0], Node):
        out.append(node)
        node = node.args[0]
    return node


def projection_at(captured: Captured, node: Node) -> Projection | None:
    """The projection whose main op is `node`, or None."""
    if _is(node, aten.linear.default):
        w = _param(captured, node.args[1])
        b = _param(captured, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        shape = _shape(node.args[1])
        if w is None or shape is None or len(shape) != 2:
            return None
        return Projection(node.args[0], node, w, b, "linear", shape[1], shape[0], [node])
    if _is(node, aten.addmm.default):
        b, x2d, wnode = node.args[:3]
        w, shape = _param(captured, wnode), _shape(wnode)
        if w is None or shape is None or len(shape) != 2 or _param(captured, b) is None:
            return None
        pre: list[Node] = []
        x = _through_views_back(x2d, pre)
        nodes = [*reversed(pre), node]
        out = node
        users = list(node.users)
        if len(users) == 1 and _is(users[0], *_VIEWS):
            out = users[0]
            nodes.append(out)
        return Projection(x, out, w, _param(captured, b), "conv1d", shape[0], shape[1], nodes)
    if _is(node, aten.matmul.default, aten.mm.default):
        x, wnode = node.args[:2]
        nodes, layout = [node], "conv1d"
        if _is(wnode, aten.t.default, aten.permute.default, aten.transpose.int):
            nodes.insert(0, wnode)
            wnode, layout = wnode.args[0], "linear"
        w, shape = _param(captured, wnode), _shape(wnode)
        if w is None or shape is None or len(shape) != 2:
            return None
        fin, fout = (shape[1], shape[0]) if layout == "linear" else shape
        out, bias = node, None
        users = list(node.users)
        if len(users) == 1 and _is(users[0], aten.add.Tensor):
            other = [a for a in users[0].args if a is not node]
            if other and _param(captured, other[0]) is not None:
                out, bias = users[0], _param(captured, other[0])
                nodes.append(out)
        return Projection(x, out, w, bias, layout, fin, fout, nodes)
    return None


def _activation_region(start: Node, root: Node) -> list[Node] | None:
    """Nodes computing `start` from `root` alone (plus constants), in graph order; None if
    `start` depends on anything else or the region is implausibly large for an activation."""
    region: dict[Node, None] = {}
    todo = [start]
    while todo:
        n = todo.pop()
        if n is root or n in region:
            continue
        if n.op != "call_function" or len(region) >= _MAX_ACTIVATION_NODES:
            return None
        region[n] = None
        todo.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(region, key=order.__getitem__)


def _region_fn(region: list[Node], root: Node):
    """A callable evaluating the region with `root` bound to its argument."""

    def fn(value: torch.Tensor) -> torch.Tensor:
        env: dict[Node, object] = {root: value}
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


def _same_input(a: Node, b: Node) -> bool:
    return _through_views_back(a, []) is _through_views_back(b, [])


def _find_projection_ending_at(captured: Captured, node: Node, skipped: list[Node]) -> Projection | None:
    """A projection whose output is `node` (looking through trailing views)."""
    probe = node
    while True:
        for cand in (probe, *probe.all_input_nodes[:1]):
            proj = projection_at(captured, cand)
            if proj is not None and proj.output is probe:
                return proj
        if _is(probe, *_VIEWS):
            skipped.append(probe)
            probe = probe.args[0]
            continue
        return None


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
            if not _same_input(g_proj.input, up.input):
                continue
            act = identify_activation(_region_fn(region, g_proj.output))
            front = [*g_proj.nodes, *region, *up.nodes, *up_extra, z]
            m = FFNMatch("gated", _through_views_back(g_proj.input, []), w2.output, g_proj, w2, up, act,
                         _ordered(front), between, dropout)
            return _check(m)
    # dense: z = act(W1 x)
    g = _find_gate(captured, z)
    if g is None:
        return None
    w1, region = g
    if not region:
        return None  # two projections in a row: no nonlinearity, not an FFN
    act = identify_activation(_region_fn(region, w1.output))
    m = FFNMatch("dense", _through_views_back(w1.input, []), w2.output, w1, w2, None, act,
                 _ordered([*w1.nodes, *region]), between, dropout)
    return _check(m)


def _find_gate(captured: Captured, node: Node) -> tuple[Projection, list[Node]] | None:
    """Find a projection P such that `node` is an elementwise function of P's output alone."""
    seen: set[Node] = set()
    todo = [node]
    while todo and len(seen) < _MAX_ACTIVATION_NODES:
        n = todo.pop(0)
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        proj = projection_at(captured, n)
        if proj is None and n.all_input_nodes:
            proj = projection_at(captured, n.all_input_nodes[0])
            if proj is not None and proj.output is not n:
                proj = None
        if proj is not None and proj.output is n:
            region = _activation_region(node, n)
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
    if m.activation is None:
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
