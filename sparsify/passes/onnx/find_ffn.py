"""`find-ffn-onnx`: every FFN of an ONNX graph, as the same `FFNSite` records as `find-ffn`.

An FFN is an output projection (MatMul or GPT-2's Gemm by a constant [I, H]) whose input is an
activation of one projection of the hidden states (dense form) or the product of an activated
and a plain projection of them (gated form); see `trace.trace_ffn`. A candidate is kept only
when no value inside it is used outside, so replacing it changes nothing else; otherwise it is
rejected with the reason.

Sites are named by the torch module scope the exporter recorded (`pkg.torch.onnx.name_scopes`)
when there is one, else by the weights' names, else by position. A name with a layer number
(`model.layers.3.mlp`) gives the stack and index that `select-layers` counts with.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, replace

import onnx_ir as ir

from ...plan import FFNSite, Rejected
from ..find_ffn import _stack_and_layer
from .trace import FFNTrace, Projection, projection_at, through_ones, trace_ffn

__all__ = ["OnnxFFN", "FindFFNOnnx", "find_ffns"]


@dataclass
class OnnxFFN:
    """An FFN found in an ONNX graph: its plan record and the graph objects it covers."""

    site: FFNSite
    trace: FFNTrace
    down: Projection

    @property
    def input(self) -> ir.Value:
        """The hidden states the FFN reads."""
        return self.trace.input

    @property
    def output(self) -> ir.Value:
        """The value the FFN produces."""
        return self.down.output

    def projections(self) -> dict[str, Projection]:
        """w1 (first or gate), w3 (up, gated only), w2 (output) projections."""
        out = {"w1": self.trace.gate, "w2": self.down}
        if self.trace.up is not None:
            out["w3"] = self.trace.up
        return out


def _scope(node: ir.Node) -> list[str]:
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    try:
        return [str(s) for s in ast.literal_eval(text)][:-1] if text else []
    except (ValueError, SyntaxError):
        return []


def _site_name(nodes: list[ir.Node], weights: list[str], position: int) -> str:
    """The innermost module owning every node, else the weights' common name prefix."""
    scopes = [s for s in (_scope(n) for n in nodes) if s]  # the exporter leaves some nodes (Split) unscoped
    if scopes:
        common = [level[0] for level in zip(*scopes) if all(x == level[0] for x in level)]
        if common and common[-1]:
            return common[-1]
    prefix = os.path.commonprefix(weights).rstrip("._")
    if prefix.count(".") >= 1 and any(ch.isdigit() for ch in prefix):
        return prefix
    return f"ffn{position}"


def _check_shapes(t: FFNTrace, down: Projection) -> tuple[int, int] | str:
    w1, w2 = t.gate.matrix().shape, down.matrix().shape
    h, i = w1
    if w2 != (i, h):
        return f"the projections do not chain: first weight [in, out] {list(w1)}, output weight {list(w2)}"
    if t.up is not None and t.up.matrix().shape != (h, i):
        return f"the up projection has shape {list(t.up.matrix().shape)}, the gate {list(w1)}"
    for p, n in ((t.gate, i), (t.up, i), (down, h)):
        if p is not None and p.bias is not None and tuple(p.bias_array().shape) != (n,):
            return f"bias '{p.bias.name}' is not a vector of {n}"
    return h, i


def find_ffns(model: ir.Model) -> tuple[list[OnnxFFN], list[Rejected]]:
    """FFNs of `model`'s main graph (in layer order within each stack) and rejected candidates."""
    found: list[OnnxFFN] = []
    rejected: list[Rejected] = []
    for node in model.graph:
        down = projection_at(node, rank=2)
        if down is None:
            continue
        a, ones = through_ones(down.input)  # products by 1 before the output projection are part of it
        if ones:
            down = replace(down, input=a, nodes=[*ones, *down.nodes])
        t = trace_ffn(a, rank=2)
        if t is None:
            continue
        traced = isinstance(t, FFNTrace)
        roles = [t.gate, t.up, down] if traced else [down]
        weights = [p.weight.name or "" for p in roles if p is not None]
        name = _site_name([*(t.nodes if traced else []), *down.nodes], weights, len(found) + len(rejected))
        problem = None if traced else t
        if problem is None and any(v.is_graph_output() or any(user not in down.nodes for user, _ in v.uses())
                                   for v in (a, *(n.outputs[0] for n in ones))):
            problem = "the activation output is also used outside the FFN"
        if problem is None:
            dims = _check_shapes(t, down)
            problem = dims if isinstance(dims, str) else None
        if problem is not None:
            rejected.append(Rejected(name, problem))
            continue
        h, i = dims
        site = _make_site(name, t, down, h, i)
        found.append(OnnxFFN(site, t, down))
    _number(found)
    return found, rejected


def _make_site(name: str, t: FFNTrace, down: Projection, h: int, i: int) -> FFNSite:
    projections = {"w1": t.gate, "w2": down, **({"w3": t.up} if t.up is not None else {})}
    weights = {role: p.weight.name or "" for role, p in projections.items()}
    weights.update({"b" + role[1]: p.bias.name or "" for role, p in projections.items() if p.bias is not None})
    fused = {role: list(p.part) for role, p in projections.items() if p.part is not None}
    fused.update({"b" + role[1]: part for role, part in list(fused.items()) if "b" + role[1] in weights})
    stack, _ = _stack_and_layer(name)
    return FFNSite(path=name, form=t.form, activation=t.activation, hidden_size=h, intermediate_size=i,
                   weights=weights, layout="conv1d", stack=stack, fused=fused)


def _number(found: list[OnnxFFN]) -> None:
    """Unique names, and the index of each site within its stack (layer order, then graph order)."""
    seen: dict[str, int] = {}
    for f in found:
        n = seen.get(f.site.path, 0)
        seen[f.site.path] = n + 1
        if n:
            f.site.path = f"{f.site.path}#{n}"
    by_stack: dict[str, list[FFNSite]] = {}
    for f in found:
        by_stack.setdefault(f.site.stack, []).append(f.site)
    for group in by_stack.values():
        order = sorted(range(len(group)), key=lambda j: (_stack_and_layer(group[j].path)[1] or 0, j))
        for index, j in enumerate(order):
            group[j].index = index


class FindFFNOnnx(ir.passes.InPlacePass):
    """Find every FFN of an ONNX model; the result is in `self.found` and `self.rejected`."""

    name = "find-ffn-onnx"

    def __init__(self) -> None:
        super().__init__()
        self.found: list[OnnxFFN] = []
        self.rejected: list[Rejected] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.found, self.rejected = find_ffns(model)
        return ir.passes.PassResult(model, modified=False)
