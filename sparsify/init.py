"""Deterministic initial values of new tensors: router weights and each expert's weights.

Each random value comes from its own generator, seeded from (seed, site path, tensor role,
expert), so any executor (in memory, streaming, ONNX, one rank of many) produces the same bytes
in any order. `expert_weight` is the one formula that turns a dense FFN weight into an expert's
(neuron range, Drop-Upcycling re-initialisation, noise, output scale); every executor calls it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from .errors import PlanError

if TYPE_CHECKING:
    from .layer_plan import LayerPlan
    from .plan import FFNSite, UpcyclePlan

__all__ = ["derived_generator", "router_weight", "expert_noise", "expert_weight", "router_init_weight",
           "canonical_shape", "reinit_neurons"]


def derived_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from `seed` and `parts` (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def router_weight(site_path: str, num_experts: int, hidden_size: int, std: float, seed: int) -> torch.Tensor:
    """Random router weight [E, H] (float32): normal(0, std)."""
    g = derived_generator(seed, "router", site_path)
    return torch.randn(num_experts, hidden_size, generator=g, dtype=torch.float32) * std


def expert_noise(site_path: str, role: str, expert: int | str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """Noise (float32, normal(0, std)) added to expert `expert`'s copy of weight `role`."""
    g = derived_generator(seed, "noise", site_path, role, expert)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32) * std


def canonical_shape(site: "FFNSite", role: str, size: int | None = None) -> tuple[int, ...]:
    """Shape of weight `role` in the experts' canonical layout ([out, in]) for an expert of
    `size` intermediate neurons (default: the whole FFN)."""
    h, i = site.hidden_size, size if size is not None else site.intermediate_size
    return {"w1": (i, h), "w3": (i, h), "w2": (h, i), "b1": (i,), "b3": (i,), "b2": (h,)}[role]


def _neuron_axis(role: str) -> int | None:
    # canonical [out, in]: w1/w3 rows and b1/b3 entries are neurons, w2's columns are
    return {"w1": 0, "w3": 0, "b1": 0, "b3": 0, "w2": 1}.get(role)


def reinit_neurons(site: "FFNSite", expert: int | str, count: int, share: float, seed: int) -> torch.Tensor:
    """Which of an expert's `count` neurons Drop-Upcycling re-initialises (sorted positions
    within the expert): round(share x count) of them, a different random set per expert."""
    n = round(share * count)
    g = derived_generator(seed, "drop", site.path, expert)
    return torch.randperm(count, generator=g)[:n].sort().values


_last_statistics: tuple[tuple, tuple[float, float]] | None = None


def _statistics(dense: torch.Tensor, where: tuple) -> tuple[float, float]:
    """Mean and std of a whole original weight, in float64 over its canonical layout (so that
    every executor, whatever the strides of its copy, draws the same values). All experts of a
    role read the same buffer, so the last result is kept."""
    global _last_statistics
    key = (*where, dense.data_ptr(), tuple(dense.shape), dense.dtype, dense._version)
    if _last_statistics is None or _last_statistics[0] != key:
        stats = dense.detach().contiguous().double()
        _last_statistics = (key, (float(stats.mean()), float(stats.std()) if stats.numel() > 1 else 0.0))
    return _last_statistics[1]


def expert_weight(site: "FFNSite", layer: "LayerPlan", expert: int | str, role: str, dense: torch.Tensor,
                  seed: int) -> torch.Tensor:
    """Expert `expert`'s weight `role` (or the shared expert's, `expert="shared"`) made from the
    dense FFN's weight `dense` in canonical layout, as `layer` says: its neuron range, the
    re-initialised share drawn from normal(mean, std) of `dense` (Drop-Upcycling), noise, and
    the output scale. An exact copy returns `dense` itself (one buffer serves every copy)."""
    init = layer.shared if expert == "shared" else layer.experts[expert]
    if init is None:
        raise PlanError(f"the layer plan of {site.path} has no shared expert")
    start, stop = init.span(site)
    axis = _neuron_axis(role)
    value = dense
    if axis is not None and (start, stop) != (0, site.intermediate_size):
        value = dense.narrow(axis, start, stop - start)
    work = None  # a float32 copy, made only when something changes the values
    if init.reinit > 0 and axis is not None:
        chosen = reinit_neurons(site, expert, stop - start, init.reinit, seed)
        if chosen.numel():
            work = value.float().clone()
            mean, std = _statistics(dense, (site.path, role, init.source))
            shape = list(work.shape)
            shape[axis] = chosen.numel()
            fresh = torch.randn(shape, generator=derived_generator(seed, "drop-init", site.path, role, expert))
            work.index_copy_(axis, chosen, fresh * std + mean)
    if init.noise > 0 and role.startswith("w"):
        work = (value.float() if work is None else work) + expert_noise(site.path, role, expert, value.shape, init.noise, seed)
    scale = init.scale if role == "w2" else init.bias_scale if role == "b2" else 1.0
    if scale != 1.0:
        work = (value.float() if work is None else work) * scale
    return value if work is None else work.to(dense.dtype)


def router_init_weight(plan: "UpcyclePlan", site: "FFNSite") -> torch.Tensor:
    """The initial router weight [E, H] (float32) of a selected site: computed from data by a
    router-init pass (held in `plan.router_weights`), or random with rows repeated per group."""
    layer = plan.layer(site)
    e, h = layer.moe.num_experts, site.hidden_size
    given = plan.router_weights.get(site.path)
    if given is not None:
        if tuple(given.shape) != (e, h):
            raise PlanError(f"the router weight computed for {site.path} has shape {tuple(given.shape)}, not {(e, h)}")
        return given.float()
    if layer.router.kind != "random":
        raise PlanError(f"the {layer.router.kind} router initialisation of {site.path} has not been computed; "
                        "run the init-router pass before writing")
    groups = layer.router.groups
    rows = router_weight(site.path, e // groups, h, layer.router.std, plan.seed)
    return rows.repeat_interleave(groups, dim=0) if groups > 1 else rows
