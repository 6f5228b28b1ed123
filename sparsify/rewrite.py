"""The in-memory executor: apply an `UpcyclePlan` to an `nn.Module`.

Each selected site's module is replaced by a `SparseMoE` whose experts are made from the site's
FFN as the site's `LayerPlan` says (copies, shards, re-initialised shares, noise, scale; see
`sparsify.init.expert_weight`) and whose router starts as the plan says. On a meta-device model
the MoE modules are created empty, which is how `sparsify.load` rebuilds a converted model
before reading its weights.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .errors import PlanError
from .init import canonical_shape, expert_weight, router_init_weight
from .layer_plan import LayerPlan
from .moe import Experts, Router, SharedExpert, SparseMoE
from .plan import FFNSite, UpcyclePlan

__all__ = ["apply_plan", "canonical_weight", "build_moe", "dense_reader"]


def canonical_weight(site: FFNSite, role: str, tensor: torch.Tensor) -> torch.Tensor:
    """A source tensor in the experts' canonical layout ([out, in] for weights)."""
    if site.layout == "conv1d" and role.startswith("w"):
        return tensor.t()
    return tensor


def build_moe(site: FFNSite, layer: LayerPlan, dtype: torch.dtype, device: torch.device) -> SparseMoE:
    """An empty `SparseMoE` for `site` as `layer` plans it (weights uninitialised)."""
    bias = tuple(f"b{i}" in site.weights for i in (1, 2, 3))
    common = dict(form=site.form, activation=site.activation, bias=bias, dropout=site.dropout, dtype=dtype, device=device)
    experts = Experts(layer.moe.num_experts, site.hidden_size, layer.expert_size(site), **common)
    shared = SharedExpert(site.hidden_size, layer.shared.size(site), **common) if layer.shared else None
    router = Router(site.hidden_size, layer.moe).to(device)
    return SparseMoE(router, experts, out_dropout=site.out_dropout, shared=shared)


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PlanError(f"the plan names module '{path}', which this model does not have; "
                        "was the plan made for another architecture?") from None


def dense_reader(models: dict[str, nn.Module]) -> Callable[[str, FFNSite, str], torch.Tensor]:
    """`read(source, site, role)`: the dense FFN weight `role` of `site` in canonical layout,
    from the in-memory model named `source` ("base" or an expert source), shape-checked."""

    def read(source: str, site: FFNSite, role: str) -> torch.Tensor:
        if source not in models:
            raise PlanError(f"the plan reads experts of {site.path} from '{source}', which was not given")
        try:
            tensor = models[source].get_parameter(site.weights[role])
        except AttributeError:
            raise PlanError(f"'{source}' has no parameter '{site.weights[role]}' that the plan reads") from None
        value = canonical_weight(site, role, tensor.detach())
        expected = canonical_shape(site, role)
        if tuple(value.shape) != expected:
            raise PlanError(f"tensor '{site.weights[role]}' of '{source}' has shape {tuple(value.shape)}, the plan "
                            f"expects {expected}; the plan does not match this model")
        return value

    return read


@torch.no_grad()
def apply_plan(model: nn.Module, plan: UpcyclePlan, copy_weights: bool = True,
               sources: dict[str, nn.Module] | None = None) -> nn.Module:
    """Replace every selected site of `model` by an MoE, in place; returns `model`.

    With `copy_weights`, experts are made from the dense FFNs (of `model`, the "base", or of the
    models in `sources` that the plan names) and routers start as the plan says; otherwise the
    new tensors are left uninitialised for the caller to load.
    """
    if plan.selected and not plan.layers:
        raise PlanError("the plan has no MoE settings; run upcycle-ffn to make them")
    read = dense_reader({"base": model, **(sources or {})})
    for site in plan.selected_sites:
        layer = plan.layer(site)
        ref = model.get_parameter(site.weights["w1"])
        moe = build_moe(site, layer, ref.dtype, ref.device)
        if copy_weights and ref.device.type != "meta":
            for role in site.weights:
                targets = [(e, getattr(moe.experts, role)[e]) for e in range(layer.moe.num_experts)]
                if moe.shared is not None:
                    targets.append(("shared", getattr(moe.shared, role)))
                for e, target in targets:
                    init = layer.shared if e == "shared" else layer.experts[e]
                    target.copy_(expert_weight(site, layer, e, role, read(init.source, site, role), plan.seed))
            moe.router.weight.copy_(router_init_weight(plan, site))
        moe.train(_get(model, site.path).training)  # a replacement keeps the replaced module's mode
        _replace(model, site.path, moe)
        if site.exit_path:
            _replace(model, site.exit_path, nn.Identity())
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    _get(model, path)
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, new)
