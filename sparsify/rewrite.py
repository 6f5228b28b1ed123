"""The in-memory executor: apply an `UpcyclePlan` to an `nn.Module`.

Each selected site's module is replaced by a `SparseMoE` whose experts are copies of the
site's FFN (plus optional noise) and whose router is freshly initialised. On a meta-device
model the MoE modules are created empty, which is how `sparsify.load` rebuilds a converted
model before reading its weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import PlanError
from .init import expert_noise, router_weight
from .moe import Experts, MoEConfig, Router, SparseMoE
from .plan import FFNSite, UpcyclePlan

__all__ = ["apply_plan", "canonical_weight", "build_moe", "noisy_copy"]


def canonical_weight(site: FFNSite, role: str, tensor: torch.Tensor) -> torch.Tensor:
    """A source tensor in the experts' canonical layout ([out, in] for weights)."""
    if site.layout == "conv1d" and role.startswith("w"):
        return tensor.t()
    return tensor


def build_moe(site: FFNSite, config: MoEConfig, dtype: torch.dtype, device: torch.device) -> SparseMoE:
    """An empty `SparseMoE` for `site` (weights uninitialised)."""
    bias = tuple(f"b{i}" in site.weights for i in (1, 2, 3))
    experts = Experts(
        config.num_experts,
        site.hidden_size,
        site.intermediate_size,
        form=site.form,
        activation=site.activation,
        bias=bias,
        dropout=site.dropout,
        dtype=dtype,
        device=device,
    )
    router = Router(site.hidden_size, config).to(device)
    return SparseMoE(router, experts, out_dropout=site.out_dropout)


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PlanError(f"the plan names module '{path}', which this model does not have; "
                        "was the plan made for another architecture?") from None


def _check_shape(site: FFNSite, role: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise PlanError(
            f"tensor '{site.weights[role]}' has shape {tuple(tensor.shape)}, the plan expects {expected}; "
            "the plan does not match this model"
        )


def _expected(site: FFNSite, role: str) -> tuple[int, ...]:
    h, i = site.hidden_size, site.intermediate_size
    return {"w1": (i, h), "w3": (i, h), "w2": (h, i), "b1": (i,), "b3": (i,), "b2": (h,)}[role]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: UpcyclePlan, copy_weights: bool = True) -> nn.Module:
    """Replace every selected site of `model` by an MoE, in place; returns `model`.

    With `copy_weights`, experts start as copies of the dense FFN (plus `plan.init["noise"]`)
    and routers from `plan.init["router_init_std"]`; otherwise the new tensors are left
    uninitialised for the caller to load.
    """
    if plan.moe is None:
        raise PlanError("the plan has no MoE settings; run upcycle-ffn to make them")
    init = plan.init
    noise, std, seed = float(init.get("noise", 0.0)), float(init.get("router_init_std", 0.02)), int(init.get("seed", 0))
    for site in plan.selected_sites:
        source = {role: model.get_parameter(name) for role, name in site.weights.items()}
        ref = source["w1"]
        moe = build_moe(site, plan.moe, ref.dtype, ref.device)
        if copy_weights and ref.device.type != "meta":
            for role, tensor in source.items():
                value = canonical_weight(site, role, tensor.detach())
                _check_shape(site, role, value, _expected(site, role))
                target = getattr(moe.experts, role)
                value = value.to(target.dtype)
                for e in range(plan.moe.num_experts):
                    if noise > 0 and role.startswith("w"):
                        target[e].copy_(noisy_copy(value, site, role, e, noise, seed))
                    else:
                        target[e].copy_(value)
            moe.router.weight.copy_(router_weight(site.path, plan.moe.num_experts, site.hidden_size, std, seed))
        moe.train(_get(model, site.path).training)  # a replacement keeps the replaced module's mode
        _replace(model, site.path, moe)
        if site.exit_path:
            _replace(model, site.exit_path, nn.Identity())
    return model


def noisy_copy(value: torch.Tensor, site: FFNSite, role: str, expert: int, std: float, seed: int) -> torch.Tensor:
    """Expert `expert`'s copy of `value` with its noise: the one formula every executor uses."""
    noise = expert_noise(site.path, role, expert, value.shape, std, seed)
    return (value.float() + noise).to(value.dtype)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    _get(model, path)
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, new)
