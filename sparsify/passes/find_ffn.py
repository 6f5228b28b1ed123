"""`find-ffn`: every FFN in the model, as `FFNSite` records, from the captured ATen graph.

A match (see `sparsify.ffn_match`) becomes a site only when modules own exactly its nodes, so
that swapping them for an MoE of its copies changes nothing else: one module (T5's
DenseReluDense, Llama's MLP), or a chain of modules called by one layer (BERT's intermediate
and output.dense, BART's fc1/activation_fn/fc2); see `sparsify.passes.ffn_owner`. Pieces of a
chain that the layer's own forward computes (a dropout rate, an activation function) are taken
over by the MoE through the attributes they come from (`sparsify.passes.probe_attributes`).
An FFN whose weights run more than once (shared across layers) is one site, one MoE.

Anything else is reported as rejected, with the reason.
"""

from __future__ import annotations

import torch.nn as nn
from torch.fx import Node

from ..capture import capture
from ..errors import NoFFNFoundError
from ..ffn_match import FFNMatch, match_ffns
from ..plan import FFNSite, Rejected
from .ffn_owner import ModuleIndex, Owner, common_module, find_owner, within
from .infra import Pass, PassContext
from .probe_attributes import Need, resolve_overrides

__all__ = ["FindFFN", "find_ffn", "causal_scopes", "fast_path_overrides"]


def _module_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.split("@")[0]


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


# torch's own layers run a fused C++ fast path in inference that reads `linear1.weight` and
# friends directly; once the FFN is an MoE those weights are gone, so the rewrite turns the fast
# path off (these flags are what torch itself checks before taking it).
_FAST_PATHS = {nn.TransformerEncoderLayer: {"activation_relu_or_gelu": 0}, nn.TransformerEncoder: {"use_nested_tensor": False}}


def fast_path_overrides(model: nn.Module, path: str) -> dict[str, object]:
    """Overrides that keep the modules above `path` off fast paths that read its weights."""
    out: dict[str, object] = {}
    parts = path.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i])
        module = model.get_submodule(prefix)
        for cls, flags in _FAST_PATHS.items():
            if isinstance(module, cls):
                out.update({f"{prefix}.{k}" if prefix else k: v for k, v in flags.items()})
    return out


def _site(m: FFNMatch, owner: Owner, causal: list[str]) -> FFNSite:
    roles = m.projections
    weights = {r: p.weight for r, p in roles.items()}
    weights.update({"b" + r[1]: p.bias for r, p in roles.items() if p.bias})
    fused = {r: list(p.part) for r, p in roles.items() if p.part is not None}
    fused.update({"b" + r[1]: part for r, part in list(fused.items()) if "b" + r[1] in weights})
    stack, _ = _stack_and_layer(owner.path)
    return FFNSite(
        path=owner.path,
        form=m.form,
        activation=m.activation or "",
        hidden_size=m.w1.in_features,
        intermediate_size=m.w1.out_features,
        weights=weights,
        layout=m.w1.layout,
        exit_path=owner.exit_path,
        stack=stack,
        dropout=m.dropout,
        out_dropout=owner.out_dropout,
        causal=any(within(owner.path, c) for c in causal),
        identities=list(owner.identities),
        fused=fused,
        groups={r: p.groups for r, p in roles.items() if p.groups != 1},
        feature_axis=m.w1.feature_axis,
        activation_params=dict(m.activation_params),
    )


def _layer_call(node: Node, layer_path: str) -> str:
    """Which call of module `layer_path` computed `node` (torch.export keys the k-th call of a
    module `name@k`); "" when that module is not in its stack."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if path.split("@")[0] == layer_path:
            return key
    return ""


def _number(sites: list[tuple[FFNSite, list[FFNMatch]]], order: dict[Node, int]) -> None:
    """Each site's index within its stack, in layer order (graph order breaks ties). A shared
    FFN has one index per call of its layer (ALBERT runs one layer module at every depth; a
    module without a layer number, per call of itself); calls within one call of the layer
    (Pegasus-X's local and global tokens) share an index."""
    by_stack: dict[str, list[tuple[int, int, FFNSite]]] = {}
    for site, calls in sites:
        layer = _stack_and_layer(site.path)[1]
        layer_path = ".".join(filter(None, [site.stack, str(layer)])) if layer is not None else site.path
        first: dict[str, int] = {}
        for call in calls:
            key = _layer_call(call.nodes[0], layer_path)
            first[key] = min(first.get(key, len(order)), order[call.nodes[0]])
        for position in first.values():
            by_stack.setdefault(site.stack, []).append((layer or 0, position, site))
    for entries in by_stack.values():
        entries.sort(key=lambda e: e[:2])
        seen: set[int] = set()
        for j, (_, _, site) in enumerate(entries):
            if id(site) in seen:
                site.calls.append(j)
            else:
                seen.add(id(site))
                site.index = j


def find_ffn(ctx: PassContext) -> tuple[list[FFNSite], list[Rejected]]:
    """Sites and rejected candidates of the captured model in `ctx` (captures it if needed)."""
    if ctx.captured is None:
        ctx.captured = capture(ctx.model, ctx.example_inputs, ctx.example_kwargs)
    graph = ctx.captured.graph
    by_module = {n: _module_of(n) for n in graph.nodes if n.op == "call_function"}
    index = ModuleIndex(by_module, ctx.model)
    causal = causal_scopes(ctx.model)
    rejected: list[Rejected] = []
    groups: dict[tuple[str, ...], list[FFNMatch]] = {}
    for m in match_ffns(ctx.captured):
        if m.problem:
            rejected.append(Rejected(common_module([by_module[n] for n in m.nodes]), m.problem))
        else:
            groups.setdefault(m.key, []).append(m)
    found: list[tuple[FFNSite, list[FFNMatch], Owner]] = []
    seen: set[str] = set()
    for calls in groups.values():
        m = calls[0]
        owners = [find_owner(call, calls, index) for call in calls]
        owner = owners[0]
        if isinstance(owner, str):
            rejected.append(Rejected(common_module([by_module[n] for n in m.nodes]), owner))
            continue
        if any(not isinstance(o, Owner) or (o.path, o.exit_path, o.identities) != (owner.path, owner.exit_path,
                                                                                   owner.identities) for o in owners):
            rejected.append(Rejected(owner.path, "the FFN's weights are used by differently built calls"))
            continue
        if owner.path in seen:
            continue
        seen.add(owner.path)
        found.append((_site(m, owner, causal), calls, owner))
    needs = [Need(site.path, piece, site.weights["w1"], site.weights["w2"], site.activation)
             for site, _, owner in found for piece in owner.plain]
    overrides = resolve_overrides(ctx.model, ctx.captured, needs) if needs else {}
    sites: list[tuple[FFNSite, list[FFNMatch]]] = []
    for site, calls, _ in found:
        got = overrides.get(site.path, {})
        if isinstance(got, str):
            rejected.append(Rejected(site.path, got))
            continue
        site.overrides = {**got, **fast_path_overrides(ctx.model, site.path)}
        sites.append((site, calls))
    _number(sites, {n: i for i, n in enumerate(graph.nodes)})
    return [s for s, _ in sites], rejected


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
