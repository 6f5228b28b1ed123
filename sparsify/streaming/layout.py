"""What each tensor of an upcycled output holds, read off the format's own writer.

A format's `tensors()` (sparsify.formats) names the stored tensors and says what goes into each
through a `TensorSource`. Run against a source that hands out meta tensors and notes every
request, it tells, for each stored tensor, which tensor of the converted model it is: a plain
tensor by state-dict name, a router, expert e's weight of a role, or, when the writer stacks
them, one row per expert. A stored tensor the writer computes from what it read (Qwen2-MoE's
doubled shared-expert projection) is marked derived, one it makes from nothing (that block's
gate of zeros) constant. One description serves every format, and no table of names here can
drift from the writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import PlanError
from ..formats.base import OutputFormat
from ..formats.tensors import TensorSource
from ..init import canonical_shape
from ..plan import FFNSite, UpcyclePlan

__all__ = ["Part", "StoredTensor", "OutputLayout"]


@dataclass(frozen=True)
class Part:
    """One tensor of the converted model, as a writer asks its source for it."""

    kind: str  # "plain" | "expert" | "router"
    name: str = ""  # plain: the converted model's state-dict name
    site: str = ""  # expert, router: the MoE layer's module path
    role: str = ""  # expert: w1 | w2 | w3 | b1 | b2 | b3
    expert: int | str | None = None  # expert: its number, or "shared"


@dataclass
class StoredTensor:
    """A tensor as the format stores it: its name and shape, what the writer read to make it
    (`reads`), and, when its pieces are those reads unchanged, the part each piece is (`parts`:
    one piece is the whole tensor; several are its rows along the first dimension)."""

    name: str
    shape: tuple[int, ...]
    reads: list[Part]
    parts: list[Part] | None

    @property
    def site(self) -> str | None:
        """The MoE layer this tensor belongs to (None for a plain tensor or a constant)."""
        return next((p.site for p in self.reads if p.kind != "plain"), None)


class _Recorder(TensorSource):
    """A source of meta tensors that remembers which request produced each."""

    def __init__(self, model: nn.Module, plan: UpcyclePlan):
        self.plan = plan
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        self.made: dict[int, tuple[torch.Tensor, Part]] = {}
        self.reads: list[Part] = []

    def _make(self, part: Part, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(shape, device="meta")
        self.made[id(t)] = (t, part)  # the tensor is kept, so that its id is not reused
        self.reads.append(part)
        return t

    def plain(self, name: str) -> torch.Tensor:
        return self._make(Part("plain", name=name), self.shapes[name])

    def plain_dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def expert(self, site: FFNSite, role: str, e: int | str) -> torch.Tensor:
        layer = self.plan.layer(site)
        size = (layer.shared if e == "shared" else layer.experts[e]).size(site)
        return self._make(Part("expert", site=site.path, role=role, expert=e), canonical_shape(site, role, size))

    def expert_dtype(self, site: FFNSite, role: str) -> torch.dtype:
        return torch.float32

    def router(self, site: FFNSite) -> torch.Tensor:
        return self._make(Part("router", site=site.path), (self.plan.layer(site).moe.num_experts, site.hidden_size))

    def part_of(self, piece: Any) -> Part | None:
        hit = self.made.get(id(piece))
        return hit[1] if hit is not None and hit[0] is piece else None


@dataclass
class OutputLayout:
    """Every stored tensor of an output in `fmt` of `plan` over `model` (the converted model, meta
    parameters are enough), in the writer's order, and where each part of the model is stored."""

    stored: dict[str, StoredTensor] = field(default_factory=dict)
    where: dict[Part, tuple[str, int | None]] = field(default_factory=dict)  # part -> (stored name, row)

    @classmethod
    def of(cls, fmt: OutputFormat, model: nn.Module, plan: UpcyclePlan) -> "OutputLayout":
        """Run `fmt`'s writer against a recording source (no weights are touched)."""
        layout = cls()
        for out in fmt.tensors(model, plan, recorder := _Recorder(model, plan)):
            recorder.reads = []
            pieces = list(out.produce())
            parts = [recorder.part_of(p) for p in pieces]
            exact = bool(parts) and all(p is not None for p in parts)
            if exact and len(parts) > 1 and tuple(out.shape) != (len(parts), *tuple(pieces[0].shape)):
                exact = False  # pieces concatenated in another way than one row each
            stored = StoredTensor(out.name, tuple(out.shape), list(recorder.reads), parts if exact else None)
            layout.stored[out.name] = stored
            for row, part in enumerate(stored.parts or []):
                layout.where[part] = (out.name, row if len(stored.parts) > 1 else None)
        return layout

    def plain(self) -> list[tuple[str, str]]:
        """(state-dict name, stored name) of each plain tensor stored as it is."""
        return [(p.name, where[0]) for p, where in self.where.items() if p.kind == "plain"]

    def of_site(self, site: str) -> list[StoredTensor]:
        """The stored tensors made from MoE layer `site` (router, experts, shared expert, derived)."""
        return [s for s in self.stored.values() if s.site == site]

    def others(self) -> list[StoredTensor]:
        """The stored tensors made from no MoE layer: plain tensors and constants."""
        return [s for s in self.stored.values() if s.site is None]

    def locate(self, part: Part) -> tuple[str, int | None]:
        """(stored name, row or None for the whole tensor) of `part`, stored as it is."""
        try:
            return self.where[part]
        except KeyError:
            raise PlanError(f"the output stores no tensor for {part}; the format derives it") from None
