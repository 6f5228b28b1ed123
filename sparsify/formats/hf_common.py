"""What the Hugging Face output formats share.

A Hugging Face MoE architecture is its dense sibling with the FFN of some layers replaced by a
router and numbered experts, so every HF writer does the same walk: each tensor of the converted
model is either a dense tensor (kept, perhaps renamed) or belongs to a selected FFN site (written
as the format's router and per-expert tensors, once per site). The format supplies the names.

Experts are written role by role (all experts' gate, then all up, then all down): a streaming
`SourceTensors` then reads each source FFN weight once, since it keeps only the last one read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from ..init import canonical_shape
from ..io.safetensors_io import OutputTensor
from ..plan import FFNSite, UpcyclePlan
from .tensors import TensorSource, alias_groups

__all__ = [
    "layer_of",
    "carried_config",
    "check_ffn",
    "check_routing",
    "check_layout",
    "check_shared",
    "expert_tensors",
    "router_tensor",
    "walk_tensors",
]

# Keys of a source config that describe the source, not the output architecture.
_IDENTITY_KEYS = {"architectures", "model_type", "transformers_version", "_name_or_path"}


def layer_of(site: FFNSite) -> int:
    """The layer number of a site: the first all-digit component of its module path."""
    return next(int(part) for part in site.path.split(".") if part.isdigit())


def carried_config(config: Any, target_cls: type, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The source config's values for every field the target config class declares (plus
    `extra`, fields the target reads with getattr but does not declare, like Qwen3-MoE's
    head_dim). Attention, norm, rope and token settings carry over; MoE fields are set after."""
    declared = {f.name for f in dataclasses.fields(target_cls)} | set(extra)
    return {k: v for k, v in config.to_dict().items() if k in declared and k not in _IDENTITY_KEYS}


def check_ffn(sites: list[FFNSite], form: str, activation: str, what: str) -> str | None:
    """Why `sites` are not `form` `activation` FFNs without biases (None if they are); `what`
    names the format's expert, e.g. 'Mixtral experts are'."""
    for s in sites:
        if s.form != form or s.activation != activation or s.has_bias:
            bias = " with biases" if s.has_bias else ""
            return f"{what} {form} {activation} FFNs without biases; {s.path} is a {s.form} {s.activation} FFN{bias}"
    return None


def check_routing(plan: UpcyclePlan, name: str) -> str | None:
    """Why the plan's routing is not one dropless softmax top-k setting for every MoE layer
    (None if it is)."""
    why = plan.uniform()
    if why:
        return f"{name} has one MoE setting for the whole model, and {why}"
    moe = plan.moe
    if moe.router != "topk":
        return f"{name} routes softmax top-k; --router {moe.router} cannot be expressed"
    if moe.capacity_factor is not None:
        return f"{name} is dropless; --capacity-factor {moe.capacity_factor} cannot be expressed"
    return None


def check_shared(plan: UpcyclePlan, name: str) -> str | None:
    """Why the plan's shared experts cannot be written in a format without them (None if it has none)."""
    site = next((s for s in plan.selected_sites if plan.layer(s).shared is not None), None)
    if site is not None:
        return f"{name} has no shared expert, and {site.path} has one (--shared-fraction); use qwen2-moe or native"
    return None


def check_layout(sites: list[FFNSite], pattern: str, example: str) -> str | None:
    """Why `sites` are not at `pattern.format(i=layer)` (None if they are). A different path
    means another model class (e.g. the bare decoder without the LM head)."""
    for s in sites:
        if s.path != pattern.format(i=layer_of(s)):
            return f"the format expects the FFNs at {pattern.format(i='N')} (a {example}); found {s.path}"
    return None


def expert_tensors(site: FFNSite, plan: UpcyclePlan, source: TensorSource,
                   names: dict[str, Callable[[int], str]]) -> list[OutputTensor]:
    """One tensor per routed expert and role; `names[role](e)` is expert e's tensor name for `role`."""
    layer = plan.layer(site)
    size = layer.expert_size(site)
    out = []
    for role, name_of in names.items():
        dtype, shape = source.expert_dtype(site, role), canonical_shape(site, role, size)
        for e in range(layer.moe.num_experts):
            out.append(OutputTensor(name_of(e), dtype, shape, lambda r=role, e=e: [source.expert(site, r, e)]))
    return out


def router_tensor(name: str, site: FFNSite, plan: UpcyclePlan, source: TensorSource,
                  dtype: torch.dtype | None = None) -> OutputTensor:
    """The router weight [E, H] under `name`, in `dtype` (default: the experts' dtype, since the
    HF MoE architectures hold the router as an ordinary Linear of the model's dtype)."""
    dtype = dtype or source.expert_dtype(site, "w1")
    experts = plan.layer(site).moe.num_experts
    return OutputTensor(name, dtype, (experts, site.hidden_size), lambda: [source.router(site)])


def walk_tensors(
    model: nn.Module,
    plan: UpcyclePlan,
    source: TensorSource,
    rename: Callable[[str], str],
    site_tensors: Callable[[FFNSite], list[OutputTensor]],
) -> list[OutputTensor]:
    """Every output tensor in the converted model's order: dense tensors under `rename(name)`,
    and `site_tensors(site)` in place of each selected site's router and stacked experts.
    Tied tensors are written once, under their first name, as the HF classes expect."""
    sites = {s.path: s for s in plan.selected_sites}
    done: set[str] = set()
    groups = alias_groups(model)
    out: list[OutputTensor] = []
    for name, t in model.state_dict(keep_vars=True).items():
        if groups[name][0] != name:
            continue
        # MoE tensors are `{site}.router.weight` and `{site}.experts.{role}`: two components deep
        site = sites.get(name.rsplit(".", 2)[0])
        if site is not None:
            if site.path not in done:
                done.add(site.path)
                out.extend(site_tensors(site))
            continue
        out.append(OutputTensor(rename(name), source.plain_dtype(name), tuple(t.shape),
                                lambda n=name: [source.plain(n)]))
    return out
