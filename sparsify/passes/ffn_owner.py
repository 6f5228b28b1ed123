"""Which modules own a matched FFN, so that replacing them by an MoE changes nothing else.

Two shapes qualify:

- owned: one module whose ops are exactly the FFN (T5's DenseReluDense, GPT-2's and Llama's
  MLP, GLM's MLP with its fused gate/up projection and chunk);
- a chain: the FFN is a sequence of modules called by one layer, each computing only FFN ops
  (BERT's `intermediate` and `output.dense`; BART's `fc1`, `activation_fn`, `fc2`; MPT's and
  Funnel's FFN modules, which also add the residual, through their projection and activation
  modules). The module reading the FFN's input becomes the MoE, the others identities. Ops of
  the chain that the layer's own forward computes must be identities on any tensor (clone,
  contiguous, dropout of rate 0) or be taken over by the MoE through an attribute the layer
  reads: a dropout rate, an activation function (`sparsify.passes.probe_attributes` finds
  which). Anything else the layer computes inside the chain rejects the candidate.

A module called more than once (weights shared across layers, ALBERT) owns the ops of all its
calls: ownership is checked against the union of every call of the same FFN.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.fx import Node

from ..ffn_match import FFNMatch, constant_scale, is_transparent

__all__ = ["Owner", "PlainPiece", "find_owner", "ModuleIndex", "common_module", "within"]

aten = torch.ops.aten

# Ops that return their input's values whatever its shape: the layer may keep computing them
# on the MoE's output.
_VALUE_IDENTITIES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}


@dataclass
class PlainPiece:
    """A piece of the FFN that a layer's own forward computes between the projections and the
    MoE must take over: a dropout (`rate`) or the activation (`nodes`), in module `path`."""

    kind: str  # "dropout" | "activation"
    path: str
    nodes: list[Node]
    rate: float = 0.0


@dataclass
class Owner:
    """The modules a site rewrites: `path` becomes the MoE; `exit_path` and `identities`
    (chain form) become identities; `plain` lists what the layer's forward computes."""

    path: str
    exit_path: str | None = None
    identities: list[str] = field(default_factory=list)
    out_dropout: float = 0.0
    plain: list[PlainPiece] = field(default_factory=list)


class ModuleIndex:
    """The module path of every graph node, and every node within each module's scope."""

    def __init__(self, by_module: dict[Node, str], model: nn.Module):
        self.by_module = by_module
        self.model = model
        self.scope: dict[str, set[Node]] = {}
        for n, path in by_module.items():
            parts = path.split(".") if path else []
            for i in range(len(parts) + 1):
                self.scope.setdefault(".".join(parts[:i]), set()).add(n)
        self._registrations: dict[int, int] | None = None

    def nodeswithin(self, path: str) -> set[Node]:
        """Nodes computed inside module `path` or its submodules."""
        return self.scope.get(path, set())

    def registrations(self, module: nn.Module) -> int:
        """How many paths `module` is registered under."""
        if self._registrations is None:
            self._registrations = {}
            for _, m in self.model.named_modules(remove_duplicate=False):
                self._registrations[id(m)] = self._registrations.get(id(m), 0) + 1
        return self._registrations.get(id(module), 0)


def common_module(paths: list[str]) -> str:
    """The innermost module path that every one of `paths` lies within."""
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def within(path: str, scope: str) -> bool:
    """True when module `path` is `scope` or lies inside it ("" is the root)."""
    return scope == "" or path == scope or path.startswith(scope + ".")


def _describe(nodes: set[Node], by_module: dict[Node, str]) -> str:
    n = sorted(nodes, key=lambda n: n.name)[0]
    return f"{n.target} in {by_module[n] or '<root>'}"


def _trailing(m: FFNMatch, scope: str, by_module: dict[Node, str]) -> tuple[list[Node], float]:
    """Transparent ops after the output projection inside `scope` (GPT-2's output dropout)."""
    out, rate, nodes = m.output, 0.0, []
    while len(out.users) == 1:
        nxt = next(iter(out.users))
        if nxt in by_module and is_transparent(nxt) and within(by_module[nxt], scope):
            if nxt.target is aten.dropout.default:
                rate = float(nxt.args[1])
            nodes.append(nxt)
            out = nxt
        else:
            break
    return nodes, rate


def _owned(m: FFNMatch, calls: list[FFNMatch], index: ModuleIndex) -> Owner | str:
    """The one module owning exactly the match (and its other calls), or why none does."""
    by_module = index.by_module
    core = [m.w1.output, m.w2.output, *m.front]
    scope = common_module([by_module[n] for n in core])
    pattern: set[Node] = set()
    for call in calls:
        pattern.update(call.nodes, _trailing(call, scope, by_module)[0])
    out_dropout = _trailing(m, scope, by_module)[1]
    inside = index.nodeswithin(scope)
    if scope and inside <= pattern and set(m.nodes) <= inside:
        return Owner(scope, out_dropout=out_dropout)
    if not scope:
        return "the FFN's ops are not inside any one submodule (it is the whole model or spread across its top level)"
    extra = inside - pattern
    scale = _output_scale(m, calls, scope, by_module)
    if scale is not None:
        return _Scaled(f"module '{scope}' multiplies the output projection's result by the constant {scale:g} "
                       "(a multiplier in the FFN's forward), which sparsify's experts do not carry")
    return (f"module '{scope}' also computes ops outside the FFN ({_describe(extra, by_module)}); "
            "put the FFN in a submodule of its own")


class _Scaled(str):
    """Why the owning module cannot be converted: it scales the FFN's output (preferred to a
    chain's reason when no chain owns the FFN either)."""


def _output_scale(m: FFNMatch, calls: list[FFNMatch], scope: str, by_module: dict[Node, str]) -> float | None:
    """The constant c when what `scope` computes beyond the FFN is `output * c` (Falcon-H1's
    down multiplier, other than 1), in every call; else None."""
    found = set()
    for call in calls:
        trail = _trailing(call, scope, by_module)[0]
        out = trail[-1] if trail else call.output
        users = list(out.users)
        c = constant_scale(users[0]) if len(users) == 1 and users[0].args[0] is out else None
        if c is None or users[0] not in by_module or not within(by_module[users[0]], scope):
            return None
        found.add(c)
    return found.pop() if len(found) == 1 else None


def _one_input(module: nn.Module) -> bool:
    """True when `module`'s forward takes exactly one required argument (so an identity put in
    its place returns what the FFN passed it)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 1


def _chain_module(path: str, layer: str, group: set[Node], index: ModuleIndex) -> str | None:
    """The outermost module between `layer` (exclusive) and `path` whose ops are all FFN ops."""
    if path == layer or not within(path, layer):
        return None
    parts = path.split(".")
    depth = len(layer.split(".")) if layer else 0
    for i in range(depth + 1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        if index.nodeswithin(candidate) <= group:
            return candidate
    return None


def _chain(m: FFNMatch, group: set[Node], index: ModuleIndex) -> Owner | str:
    """The FFN as a chain of modules called by one layer, or why it is not one."""
    by_module = index.by_module
    pattern = m.nodes
    layer = common_module([by_module[n] for n in pattern])
    modules: dict[str, list[Node]] = {}
    plain: list[Node] = []
    for n in pattern:
        owner = _chain_module(by_module[n], layer, group, index)
        (modules.setdefault(owner, []) if owner is not None else plain).append(n)
    entry = _chain_module(by_module[m.w1.nodes[0]], layer, group, index)
    where = f"the forward of '{layer or '<root>'}'"
    if entry is None:
        return None  # the first projection is not a module of its own: not a chain
    if m.w3 is not None and _chain_module(by_module[m.w3.nodes[0]], layer, group, index) != entry:
        return f"the gate and up projections are separate modules combined by {where}; put the FFN in a submodule of its own"
    exit_path = _chain_module(by_module[m.output], layer, group, index)
    if exit_path == entry:
        return None
    if exit_path is None:
        return f"the output projection is computed by {where}, not by a module of its own"
    pieces: list[PlainPiece] = []
    act = set(m.act_nodes)
    act_plain = [n for n in plain if n in act]
    if act_plain:
        if len(act_plain) != len(act):
            return f"the activation is computed partly by a module and partly by {where}"
        pieces.append(PlainPiece("activation", by_module[act_plain[0]], act_plain))
    for n in plain:
        if n in act or n.target in _VALUE_IDENTITIES or constant_scale(n) == 1.0:
            continue
        if n.target is aten.dropout.default:
            rate = float(n.args[1])
            if rate != 0.0:
                pieces.append(PlainPiece("dropout", by_module[n], [n], rate))
            continue
        return (f"{n.target} between the projections is plain code in the forward of '{by_module[n] or '<root>'}', "
                "which an MoE cannot take over; put the FFN in a submodule of its own")
    for path in modules:
        module = index.model.get_submodule(path)
        if index.registrations(module) != 1:
            return f"module '{path}' of the FFN is registered under several names; the MoE could replace only one"
        if not _one_input(module):
            return f"module '{path}' of the FFN takes several inputs; an identity in its place could return the wrong one"
    order = {n: i for i, n in enumerate(pattern[0].graph.nodes)}
    others = sorted((p for p in modules if p not in (entry, exit_path)), key=lambda p: min(order[n] for n in modules[p]))
    return Owner(entry, exit_path, others, plain=pieces)


def find_owner(m: FFNMatch, calls: list[FFNMatch], index: ModuleIndex) -> Owner | str:
    """The modules owning match `m`, whose FFN runs once per match in `calls` (shared weights:
    more than one), or why none do."""
    owned = _owned(m, calls, index)
    if isinstance(owned, Owner):
        return owned
    group = {n for call in calls for n in call.nodes}
    chain = _chain(m, group, index)
    if chain is None or (isinstance(chain, str) and isinstance(owned, _Scaled)):
        return owned
    return chain
