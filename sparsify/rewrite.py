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
from .merge import Weights, stored_name
from .moe import Experts, Router, SharedExpert, SparseMoE
from .overrides import IDENTITY, override_value
from .plan import FFNSite, UpcyclePlan

__all__ = ["apply_plan", "canonical_weight", "build_moe", "dense_reader"]


def canonical_weight(site: FFNSite, role: str, tensor: torch.Tensor) -> torch.Tensor:
    """A source tensor in the experts' canonical layout ([out, in] for weights): transposed
    from GPT-2's [in, out]; a 1x1 convolution's [out, in / groups, 1...] squeezed and, when
    grouped, expanded to the block-diagonal [out, in] matrix it applies; the role's part of a
    fused gate/up projection (half, or every second row)."""
    if role.startswith("w") and site.layout == "conv1d":
        tensor = tensor.t()
    elif role.startswith("w") and site.layout == "conv1x1":
        tensor = tensor.reshape(tensor.shape[0], -1)
        groups = site.groups.get(role, 1)
        if groups > 1:
            tensor = torch.block_diag(*tensor.chunk(groups, dim=0))
    if role in site.fused:
        part, parts, kind = site.fused[role]
        tensor = tensor[part::parts] if kind == "interleaved" else tensor.chunk(parts, dim=0)[part]
    return tensor


def build_moe(site: FFNSite, layer: LayerPlan, dtype: torch.dtype, device: torch.device,
              act_params: dict[str, tuple[tuple[int, ...], torch.dtype, bool]] | None = None) -> SparseMoE:
    """An empty `SparseMoE` for `site` as `layer` plans it (weights uninitialised); a
    parametrised activation's parameters are `act_params`: name -> (shape, dtype, trainable)."""
    bias = tuple(f"b{i}" in site.weights for i in (1, 2, 3))
    common = dict(form=site.form, activation=site.activation, bias=bias, dropout=site.dropout, dtype=dtype, device=device,
                  act_params=act_params)
    experts = Experts(layer.moe.num_experts, site.hidden_size, layer.expert_size(site), **common)
    shared = SharedExpert(site.hidden_size, layer.shared.size(site), **common) if layer.shared else None
    router = Router(site.hidden_size, layer.moe).to(device)
    return SparseMoE(router, experts, out_dropout=site.out_dropout, shared=shared, feature_axis=site.feature_axis)


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PlanError(f"the plan names module '{path}', which this model does not have; "
                        "was the plan made for another architecture?") from None


def dense_reader(models: dict[str, nn.Module | Weights]) -> Callable[[str, FFNSite, str], torch.Tensor]:
    """`read(source, site, role)`: the dense FFN weight `role` of `site` in canonical layout,
    from the model or checkpoint named `source` ("base" or an expert source), shape-checked.
    A checkpoint (`sparsify.merge.Weights`) is read by the base model's tensor names; the last
    tensor read is kept, since the experts of one role read it in turn."""
    names: dict = {}  # the base's tied names and prefix, found on the first checkpoint read
    last: list = [None, None]

    def tensor_of(source: str, name: str) -> torch.Tensor:
        held = models[source]
        if isinstance(held, nn.Module):
            try:
                return held.get_parameter(name).detach()
            except AttributeError:
                raise PlanError(f"'{source}' has no parameter '{name}' that the plan reads") from None
        if last[0] != (source, name):
            if not names:
                from .formats.tensors import alias_groups  # formats import this module

                names.update(aliases=alias_groups(models["base"]), prefix=getattr(models["base"], "base_model_prefix", "") or "")
            stored = stored_name(held, name, names["aliases"], names["prefix"])
            if stored is None:
                raise PlanError(f"'{source}' has no tensor '{name}' that the plan reads")
            last[:] = [None, None]
            last[:] = [(source, name), held.read(stored)]
        return last[1]

    def read(source: str, site: FFNSite, role: str) -> torch.Tensor:
        if source not in models:
            raise PlanError(f"the plan reads experts of {site.path} from '{source}', which was not given")
        value = canonical_weight(site, role, tensor_of(source, site.weights[role]))
        expected = canonical_shape(site, role)
        if tuple(value.shape) != expected:
            raise PlanError(f"tensor '{site.weights[role]}' of '{source}' has shape {tuple(value.shape)}, the plan "
                            f"expects {expected}; the plan does not match this model")
        return value

    return read


@torch.no_grad()
def apply_plan(model: nn.Module, plan: UpcyclePlan, copy_weights: bool = True,
               sources: dict[str, nn.Module | Weights] | None = None) -> nn.Module:
    """Replace every selected site of `model` by an MoE, in place; returns `model`.

    With `copy_weights`, experts are made from the dense FFNs (of `model`, the "base", or of the
    models or checkpoints in `sources` that the plan names) and routers start as the plan says; otherwise the
    new tensors are left uninitialised for the caller to load.
    """
    if plan.selected and not plan.layers:
        raise PlanError("the plan has no MoE settings; run upcycle-ffn to make them")
    read = dense_reader({"base": model, **(sources or {})})
    for site in plan.selected_sites:
        layer = plan.layer(site)
        ref = model.get_parameter(site.weights["w1"])
        act = {name: _model_tensor(model, source) for name, source in site.activation_params.items()}
        specs = {name: (tuple(t.shape), t.dtype, isinstance(t, nn.Parameter)) for name, t in act.items()}
        moe = build_moe(site, layer, ref.dtype, ref.device, specs)
        for module in (moe.experts, moe.shared):
            if module is not None and module.act_params is not None and copy_weights and ref.device.type != "meta":
                for name, t in act.items():
                    module.act_params[name].copy_(t.detach())
        if copy_weights and ref.device.type != "meta":
            for role in site.weights:
                targets = [(e, getattr(moe.experts, role)[e]) for e in range(layer.moe.num_experts)]
                if moe.shared is not None:
                    targets.append(("shared", getattr(moe.shared, role)))
                for e, target in targets:
                    init = layer.shared if e == "shared" else layer.experts[e]
                    target.copy_(expert_weight(site, layer, e, role, read(init.source, site, role), plan.seed))
            moe.router.weight.copy_(router_init_weight(plan, site))
        install_site(model, site, moe)
    return model


def chain_steps(site: FFNSite) -> list[str]:
    """What the dense FFN applies after the site's module, in order: the modules between
    (activation, dropout), the activation functions the layer's forward applies by attribute
    (which the plan overrides to the identity), the exit projection. `install_site` replaces
    each of these; the dense FFN is the site's module followed by them."""
    functions = [t for t, v in site.overrides.items() if v == IDENTITY]
    return [*site.identities, *functions, *([site.exit_path] if site.exit_path else [])]


def install_site(model: nn.Module, site: FFNSite, moe: nn.Module) -> dict[str, nn.Module]:
    """Put `moe` in place of `site` in `model`: its module becomes `moe` (in that module's
    training mode), its exit projection and the modules between (activation, dropout) become
    identities, and the attributes the plan overrides are set. Returns what was replaced: the
    site's module and each of its `chain_steps`, by path."""
    replaced = {site.path: _get(model, site.path)}
    moe.train(replaced[site.path].training)  # a replacement keeps the replaced module's mode
    _replace(model, site.path, moe)
    for path in site.identities:
        replaced[path] = _get(model, path)
        _replace(model, path, nn.Identity())
    for target, value in site.overrides.items():
        if value == IDENTITY:  # an activation function the layer's forward applies
            path, _, attr = target.rpartition(".")
            replaced[target] = getattr(_get(model, path) if path else model, attr)
        _override(model, target, value)
    if site.exit_path:
        replaced[site.exit_path] = _get(model, site.exit_path)
        _replace(model, site.exit_path, nn.Identity())
    return replaced


def _model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """Parameter or buffer `name` of `model`."""
    path, _, attr = name.rpartition(".")
    module = _get(model, path) if path else model
    tensor = getattr(module, attr, None)
    if not isinstance(tensor, torch.Tensor):
        raise PlanError(f"the plan reads the activation parameter '{name}', which this model does not have; "
                        "was the plan made for another architecture?")
    return tensor


def _override(model: nn.Module, target: str, value: object) -> None:
    """Set attribute `target` ("module.path.attribute") as the plan says."""
    path, _, attr = target.rpartition(".")
    module = _get(model, path) if path else model
    if not hasattr(module, attr):
        raise PlanError(f"the plan sets attribute '{attr}' of '{path or '<root>'}', which this model does not have; "
                        "was the plan made for another architecture?")
    setattr(module, attr, override_value(value))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    _get(model, path)
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, new)
