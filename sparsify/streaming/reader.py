"""Read an upcycled output one MoE layer at a time, by its `OutputLayout`.

Every stored tensor is read once, whole, with `pread` (sparsify.io.safetensors_io), and handed
to an optional `seen(stored, value)` callback before it is used (verify compares it with what
the plan makes of the dense model). A layer's experts are assembled into the stacked
[E, out, in] tensors `SparseMoE` computes with: a stored stack is used as it is, per-expert
tensors are copied into one stack as they are read (so a layer costs its own size once).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import PlanError, SourceError
from ..io.checkpoint import Checkpoint
from ..plan import FFNSite, UpcyclePlan
from .layout import OutputLayout, Part, StoredTensor

__all__ = ["Seen", "Derived", "check_names", "read_router", "read_site"]

Seen = Callable[[StoredTensor, torch.Tensor], None]
Derived = Callable[[Part], torch.Tensor]


def check_names(ckpt: Checkpoint, layout: OutputLayout, where: str) -> None:
    """Refuse an output whose stored tensors are not those its format writes for the plan, or
    whose shapes differ from them (read from the headers only)."""
    stored = set(ckpt.names())
    missing = [n for n in layout.stored if n not in stored]
    if missing:
        raise SourceError(f"'{where}' lacks tensor '{missing[0]}' ({len(missing)} in all); the output is incomplete")
    extra = sorted(stored - set(layout.stored))
    if extra:
        raise PlanError(f"'{where}' holds tensor '{extra[0]}' that the plan's model lacks; the plan does not match the weights")
    for name, s in layout.stored.items():
        if tuple(ckpt.shape(name)) != s.shape:
            raise SourceError(f"'{where}': tensor '{name}' has shape {tuple(ckpt.shape(name))}, the plan implies {s.shape}; "
                              "the output is damaged")


def read_router(ckpt: Checkpoint, layout: OutputLayout, site: FFNSite, seen: Seen | None = None) -> torch.Tensor:
    """The router weight [E, H] of `site`, in float32 (routers compute in float32)."""
    name, row = layout.locate(Part("router", site=site.path))
    stored = layout.stored[name]
    value = ckpt.read(name)
    if seen is not None:
        seen(stored, value)
    return (value if row is None else value[row]).float()


def read_site(ckpt: Checkpoint, layout: OutputLayout, plan: UpcyclePlan, site: FFNSite,
              seen: Seen | None = None, derived: Derived | None = None) -> dict[str, torch.Tensor]:
    """The state of `site`'s `SparseMoE` but its router (`experts.w1`, ..., `shared.w1`, ...).
    Every stored tensor of the layer but the router's (see `read_router`) is read once and
    shown to `seen`, those the format derives included; `derived(part)` supplies the parts stored only in derived
    form (Qwen2-MoE's doubled shared-expert projection)."""
    layer = plan.layer(site)
    done: set[str] = set()
    last: list = [None, None]  # the stored tensor read last, whose rows may be asked for next

    def read(name: str) -> torch.Tensor:
        if last[0] == name:
            return last[1]
        last[:] = [None, None]
        value = ckpt.read(name)
        if seen is not None:
            seen(layout.stored[name], value)
        done.add(name)
        last[:] = [name, value]
        return value

    def part(p: Part) -> torch.Tensor:
        if p not in layout.where:
            if derived is None:
                raise PlanError(f"the output of {site.path} stores {p.role} of expert {p.expert} in a derived form")
            return derived(p)
        name, row = layout.locate(p)
        value = read(name)
        return value if row is None else value[row]

    state: dict[str, torch.Tensor] = {}
    for role in site.weights:
        state[f"experts.{role}"] = _stack(layout, [Part("expert", site=site.path, role=role, expert=e)
                                                  for e in range(layer.moe.num_experts)], read, part)
        if layer.shared is not None:
            state[f"shared.{role}"] = part(Part("expert", site=site.path, role=role, expert="shared"))
    last[:] = [None, None]
    for stored in layout.of_site(site.path):  # derived tensors: seen too (routers: by read_router)
        if stored.name not in done and not any(p.kind == "router" for p in stored.reads):
            read(stored.name)
            last[:] = [None, None]
    return state


def _stack(layout: OutputLayout, parts: list[Part], read: Callable[[str], torch.Tensor],
           part: Callable[[Part], torch.Tensor]) -> torch.Tensor:
    """The parts stacked [E, ...]: a stored stack of exactly them is read as it is."""
    places = [layout.where.get(p) for p in parts]
    names = {p[0] for p in places if p is not None}
    if len(names) == 1 and all(p is not None and p[1] == e for e, p in enumerate(places)):
        (name,) = names
        if layout.stored[name].shape[0] == len(parts):
            return read(name)
    out = None
    for e, p in enumerate(parts):
        value = part(p)
        if out is None:
            out = torch.empty((len(parts), *value.shape), dtype=value.dtype)
        out[e] = value
        del value
    return out
