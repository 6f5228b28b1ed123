"""`find-ffn`: every FFN in the model, as `FFNSite` records, from the captured ATen graph.

A match (see `sparsify.ffn_match`) becomes a site only when a module owns exactly its nodes, so
that swapping that module for an MoE of its copies changes nothing else. Two shapes qualify:

- one module whose ops are exactly the FFN (T5's DenseReluDense, GPT-2's and Llama's MLP);
- a split FFN: one module computing exactly the first projection and activation, whose result
  goes straight into a leaf module doing the output projection (BERT's `intermediate` and
  `output.dense`). The first module becomes the MoE; the output projection becomes an identity.

Anything else is reported as rejected, with the reason.
"""

from __future__ import annotations

import torch.nn as nn
from torch.fx import Node

from ..errors import NoFFNFoundError
from ..ffn_match import TRANSPARENT, FFNMatch, match_ffns
from ..plan import FFNSite, Rejected
from .infra import Pass, PassContext
from ..capture import capture

__all__ = ["FindFFN", "find_ffn", "causal_scopes"]


def _module_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.split("@")[0]


def _common_module(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def _scope_nodes(nodes_by_module: dict[Node, str], scope: str) -> set[Node]:
    return {n for n, p in nodes_by_module.items() if _within(p, scope)}


def _describe(nodes: set[Node], by_module: dict[Node, str]) -> str:
    n = sorted(nodes, key=lambda n: n.name)[0]
    return f"{n.target} in {by_module[n] or '<root>'}"


def _is_dropout(n: Node) -> bool:
    return "dropout" in str(n.target)


def _owner(m: FFNMatch, by_module: dict[Node, str]) -> tuple[str, str | None, float] | str:
    """(module, exit module or None, out_dropout) owning exactly the match, or the reason why none does."""
    core = [m.w1.output, m.w2.output, *m.front]
    scope = _common_module([by_module[n] for n in core])
    pattern = set(m.nodes)
    # trailing transparent ops inside the scope (GPT-2's output dropout) belong to the FFN
    out, out_dropout = m.output, 0.0
    while len(out.users) == 1:
        nxt = next(iter(out.users))
        if nxt.op == "call_function" and nxt.target in TRANSPARENT and _within(by_module[nxt], scope):
            if _is_dropout(nxt):
                out_dropout = float(nxt.args[1])
            pattern.add(nxt)
            out = nxt
        else:
            break
    inside = _scope_nodes(by_module, scope)
    if scope and inside == pattern:
        return scope, None, out_dropout
    # split form: the first half owned by one module, the output projection by a leaf module
    front = set(m.front)
    head = _common_module([by_module[n] for n in m.front])
    tail = _common_module([by_module[n] for n in m.w2.nodes])
    if (
        head
        and tail
        and not _within(tail, head)
        and not _within(head, tail)
        and _scope_nodes(by_module, head) == front
        and _scope_nodes(by_module, tail) == set(m.w2.nodes)
        and all(by_module[n] not in (head, tail) for n in m.between)
    ):
        return head, tail, 0.0
    if not scope:
        return "the FFN's ops are not inside any one submodule (it is the whole model or spread across its top level)"
    extra = inside - pattern
    if extra:
        return (
            f"module '{scope}' also computes ops outside the FFN ({_describe(extra, by_module)}); "
            "put the FFN in a submodule of its own"
        )
    return f"module '{scope}' does not contain the whole FFN"


def _stack_and_layer(path: str) -> tuple[str, int | None]:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return "", None


def causal_scopes(model: nn.Module) -> list[str]:
    """Module paths whose tokens must not see later tokens (decoder stacks), from HF metadata."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    if getattr(config, "is_encoder_decoder", False):
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        return [name for name, mod in model.named_modules() if decoder is not None and mod is decoder][:1]
    if getattr(config, "is_decoder", False):
        return [""]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None)
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return [""]
    return []


def find_ffn(ctx: PassContext) -> tuple[list[FFNSite], list[Rejected]]:
    """Sites and rejected candidates of the captured model in `ctx` (captures it if needed)."""
    if ctx.captured is None:
        ctx.captured = capture(ctx.model, ctx.example_inputs, ctx.example_kwargs)
    graph = ctx.captured.graph
    by_module = {n: _module_of(n) for n in graph.nodes if n.op == "call_function"}
    causal = causal_scopes(ctx.model)
    sites: list[FFNSite] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for m in match_ffns(ctx.captured):
        where = _common_module([by_module[n] for n in m.nodes])
        if m.problem:
            rejected.append(Rejected(where, m.problem))
            continue
        owner = _owner(m, by_module)
        if isinstance(owner, str):
            rejected.append(Rejected(where, owner))
            continue
        path, exit_path, out_dropout = owner
        if path in seen:  # a module called more than once (shared weights): one site
            continue
        seen.add(path)
        roles = {"w1": m.w1, "w2": m.w2, **({"w3": m.w3} if m.w3 else {})}
        weights = {r: p.weight for r, p in roles.items()}
        weights.update({"b" + r[1]: p.bias for r, p in roles.items() if p.bias})
        stack, _ = _stack_and_layer(path)
        sites.append(
            FFNSite(
                path=path,
                form=m.form,
                activation=m.activation or "",
                hidden_size=m.w1.in_features,
                intermediate_size=m.w1.out_features,
                weights=weights,
                layout=m.w1.layout,
                exit_path=exit_path,
                stack=stack,
                dropout=m.dropout,
                out_dropout=out_dropout,
                causal=any(_within(path, c) for c in causal),
            )
        )
    # index within each stack, in layer order (graph order breaks ties)
    by_stack: dict[str, list[FFNSite]] = {}
    for s in sites:
        by_stack.setdefault(s.stack, []).append(s)
    for group in by_stack.values():
        group.sort(key=lambda s: (_stack_and_layer(s.path)[1] or 0))
        for j, s in enumerate(group):
            s.index = j
    return sites, rejected


class FindFFN(Pass):
    """Find every FFN (dense and gated forms) and record it in the plan, with rejected candidates."""

    name = "find-ffn"

    def call(self, ctx: PassContext) -> bool:
        sites, rejected = find_ffn(ctx)
        ctx.plan.sites, ctx.plan.rejected = sites, rejected
        return False

    def ensures(self, ctx: PassContext) -> None:
        if ctx.plan.sites:
            return
        if ctx.plan.rejected:
            reasons = "; ".join(str(r) for r in ctx.plan.rejected[:3])
            more = f" (+{len(ctx.plan.rejected) - 3} more)" if len(ctx.plan.rejected) > 3 else ""
            raise NoFFNFoundError(f"no convertible FFN found; rejected candidates: {reasons}{more}")
        raise NoFFNFoundError(
            "no FFN found: no two projections with an activation between them in the captured graph"
        )
