"""Which attribute of a layer feeds a piece of an inline FFN that the layer's own forward computes.

BART's layers apply `F.dropout(h, p=self.activation_dropout, training=self.training)` between
`fc1` and `fc2`; torch's `TransformerEncoderLayer` applies `self.activation(...)`, a plain
function. When such an FFN becomes an MoE, the MoE applies the dropout (for training) and the
activation itself, so the layer must stop applying them: the attribute is set to a rate of 0
or to the identity. The graph holds the rate and the activation's ops but not where they came
from, and several attributes may hold the same value (BART's `dropout` and
`activation_dropout` are both 0.1 in bart-base). So the attributes that could be the source
are each given a distinct marker (a rate never used, or `x * c` for an unused constant c), the
model is captured once more, and an attribute qualifies only when its marker appears between
the FFN's projections and nowhere else. Attributes are restored afterwards.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.fx import Node

from ..activations import identify_activation
from ..capture import Captured, capture
from ..overrides import IDENTITY
from ..projections import TRANSPOSES
from .ffn_owner import PlainPiece

__all__ = ["Need", "resolve_overrides"]

aten = torch.ops.aten

_REACH = 24  # graph steps searched between the projections


@dataclass
class Need:
    """A plain piece of the FFN of site `key` whose source attribute must be found; `w1` and
    `w2` are its projections' weight names (they locate the FFN in the probe's graph)."""

    key: str
    piece: PlainPiece
    w1: str
    w2: str
    activation: str


def _marker(c: float, x: Any, *args: Any, **kwargs: Any) -> Any:
    return x * c


def _candidates(module: nn.Module, need: Need) -> list[str]:
    found = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if need.piece.kind == "dropout":
            if type(value) is float and value == need.piece.rate:
                found.append(name)
        elif (inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, partial)) \
                and identify_activation(value) == need.activation:
            found.append(name)
    return found


def _uses(graph: torch.fx.Graph, captured: Captured, weight: str) -> set[Node]:
    """The nodes applying parameter `weight` (through a transpose of it, for `x @ W.T`)."""
    out: set[Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" and captured.param_name(n) == weight:
            for u in n.users:
                out.add(u)
                if u.op == "call_function" and u.target in TRANSPOSES:
                    out.update(u.users)
    return out


def _reach(start: set[Node], stop: set[Node], step: Callable[[Node], list[Node]]) -> set[Node]:
    seen, frontier = set(start), set(start)
    for _ in range(_REACH):
        frontier = {m for n in frontier if n not in stop or n in start for m in step(n)} - seen
        seen |= frontier
    return seen


def _between(graph: torch.fx.Graph, captured: Captured, w1: str, w2: str) -> set[Node]:
    """Nodes on a path from a use of `w1` to a use of `w2` (within a few steps)."""
    first, last = _uses(graph, captured, w1), _uses(graph, captured, w2)
    forward = _reach(first, last, lambda n: list(n.users))
    backward = _reach(last, first, lambda n: n.all_input_nodes)
    return forward & backward


def _marked(n: Node, kind: str, mark: float) -> bool:
    if n.op != "call_function":
        return False
    if kind == "dropout":
        return n.target is aten.dropout.default and len(n.args) > 1 and n.args[1] == mark
    return n.target is aten.mul.Tensor and len(n.args) == 2 and n.args[1] == mark


def resolve_overrides(model: nn.Module, captured: Captured, needs: list[Need]) -> dict[str, dict[str, Any] | str]:
    """For each need's site key: the overrides ("module.attribute" -> plan value) that make its
    layer stop applying the pieces, or the reason they cannot be found."""
    result: dict[str, dict[str, Any] | str] = {}
    probes: list[tuple[Need, nn.Module, str, float]] = []
    for need in needs:
        module = model.get_submodule(need.piece.path)
        names = _candidates(module, need)
        if not names:
            what = (f"the dropout (rate {need.piece.rate})" if need.piece.kind == "dropout"
                    else f"the activation ({need.activation})")
            result[need.key] = (f"{what} between the projections is plain code in the forward of '{need.piece.path}', "
                                "not a module or an attribute of it, so the MoE cannot take it over; make it a module "
                                "(e.g. nn.Dropout, nn.GELU) or put the FFN in a submodule of its own")
            continue
        for name in names:
            # distinct markers: rates (0.25 + k 2^-20) no model uses, scale constants 1 + k 2^-20;
            # dyadic, so they reach the graph exactly and compare exactly
            base = 0.25 if need.piece.kind == "dropout" else 1.0
            probes.append((need, module, name, base + (len(probes) + 1) * 2.0 ** -20))
    if probes:
        _probe(model, captured, probes, result)
    return result


def _probe(model: nn.Module, captured: Captured, probes: list[tuple[Need, nn.Module, str, float]],
           result: dict[str, dict[str, Any] | str]) -> None:
    saved = [(module, name, getattr(module, name)) for _, module, name, _ in probes]
    try:
        for need, module, name, mark in probes:
            setattr(module, name, mark if need.piece.kind == "dropout" else partial(_marker, mark))
        try:
            graph_of = capture(model, captured.args, captured.kwargs)
        except Exception as err:  # a model whose capture a marker breaks: nothing can be concluded
            for need, *_ in probes:
                result.setdefault(need.key, f"cannot tell which attribute of '{need.piece.path}' the FFN reads "
                                            f"({type(err).__name__})")
            return
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
    graph = graph_of.graph
    found: dict[int, list[str]] = {}
    also_outside: dict[int, str] = {}
    for need, module, name, mark in probes:
        marked = {n for n in graph.nodes if _marked(n, need.piece.kind, mark)}
        between = _between(graph, graph_of, need.w1, need.w2)
        if marked and marked <= between:
            found.setdefault(id(need), []).append(name)
        elif marked & between:
            also_outside[id(need)] = name
    for need in {id(n): n for n, *_ in probes}.values():
        names = found.get(id(need), [])
        if isinstance(result.get(need.key), str):
            continue
        if not names and id(need) in also_outside:
            # XLNet: one nn.Dropout applied between the projections and again after them
            what = "dropout rate" if need.piece.kind == "dropout" else "activation"
            where = f"{need.piece.path}.{also_outside[id(need)]}" if need.piece.path else also_outside[id(need)]
            result[need.key] = (f"no single attribute of '{need.piece.path}' holds the {what} it applies between "
                                f"the FFN's projections and nothing else: '{where}' sets it there and also outside "
                                "the FFN, so the MoE cannot take over the one without changing the other")
            continue
        if len(names) != 1:
            what = "dropout rate" if need.piece.kind == "dropout" else "activation"
            result[need.key] = (f"no single attribute of '{need.piece.path}' holds the {what} it applies between "
                                "the FFN's projections (and nothing else); the MoE cannot take it over")
            continue
        value = 0.0 if need.piece.kind == "dropout" else IDENTITY
        result.setdefault(need.key, {})[f"{need.piece.path}.{names[0]}" if need.piece.path else names[0]] = value
