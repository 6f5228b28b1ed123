"""`ExpertPlacement`: which rank holds each expert of each MoE layer (the content of plan.json).

Dense parts of the model (attention, embeddings, routers) are replicated on every rank; only
experts are placed. A placement is plain data, checked against the model it is used with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import PlanError
from ..io.atomic import atomic_file
from ..moe.config import MoEConfig
from ..plan import UpcyclePlan
from .jsonfile import read_json

__all__ = ["ExpertPlacement", "PLACEMENT_FORMAT", "contiguous_ranks", "uniform_moe"]

PLACEMENT_FORMAT = "sparsify-expert-placement"


def contiguous_ranks(num_experts: int, world_size: int) -> list[int]:
    """The naive placement of one layer: experts in order, in contiguous blocks whose sizes
    differ by at most one (the first `E % N` ranks take one more)."""
    base, extra = divmod(num_experts, world_size)
    ranks: list[int] = []
    for r in range(world_size):
        ranks += [r] * (base + (r < extra))
    return ranks


def uniform_moe(plan: UpcyclePlan) -> MoEConfig:
    """The expert count and routing every MoE layer of `plan` shares, which placement needs."""
    if not plan.selected:
        raise PlanError("the model has no MoE layers; nothing to place")
    if plan.moe is None:
        raise PlanError("expert placement needs one expert count and routing for every MoE layer, and this model "
                        "sets them per layer")
    return plan.moe


@dataclass
class ExpertPlacement:
    """`layers[path][e]` is the rank that holds expert e of the MoE layer at module `path`.

    `equal_experts`: every rank holds the same number of experts in every layer (then the
    world size divides the expert count). `report` holds the planner's figures (loads, memory,
    traffic, and the same for the contiguous placement).
    """

    world_size: int
    num_experts: int
    layers: dict[str, list[int]]
    equal_experts: bool = True
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "the placement") -> None:
        """Raise `PlanError` when a layer's ranks are out of range or leave a rank empty."""
        n, e = self.world_size, self.num_experts
        if n < 1 or e < 1:
            raise PlanError(f"{where} has world size {n} and {e} experts; both must be positive")
        for path, ranks in self.layers.items():
            if len(ranks) != e:
                raise PlanError(f"{where} places {len(ranks)} experts of layer '{path}', not {e}")
            if any(not isinstance(r, int) or not 0 <= r < n for r in ranks):
                raise PlanError(f"{where} puts an expert of layer '{path}' on a rank outside 0..{n - 1}")
            counts = self.counts(path)
            if 0 in counts:
                raise PlanError(f"{where} leaves rank {counts.index(0)} without experts in layer '{path}'")
            if self.equal_experts and len(set(counts)) > 1:
                raise PlanError(f"{where} says every rank holds the same number of experts, but layer '{path}' has {counts}")

    @classmethod
    def contiguous(cls, layers: Sequence[str], num_experts: int, world_size: int) -> "ExpertPlacement":
        """The naive placement: contiguous blocks of experts per rank, the same in every layer."""
        ranks = contiguous_ranks(num_experts, world_size)
        return cls(world_size, num_experts, {p: list(ranks) for p in layers}, num_experts % world_size == 0)

    def counts(self, layer: str) -> list[int]:
        """Experts per rank in `layer`."""
        counts = [0] * self.world_size
        for r in self.layers[layer]:
            counts[r] += 1
        return counts

    def local_experts(self, layer: str, rank: int) -> list[int]:
        """The global ids of the experts `rank` holds in `layer`, ascending."""
        return [e for e, r in enumerate(self.layers[layer]) if r == rank]

    def check_matches(self, plan: UpcyclePlan, world_size: int | None = None, where: str = "the placement") -> None:
        """Raise `PlanError` unless this placement covers exactly the MoE layers of `plan`
        (and, if given, was made for `world_size` ranks)."""
        moe = uniform_moe(plan)
        if self.num_experts != moe.num_experts:
            raise PlanError(f"{where} places {self.num_experts} experts per layer but the model has "
                            f"{moe.num_experts}; it was made for another model")
        selected = set(plan.selected)
        for path in self.layers:
            if path not in selected:
                raise PlanError(f"{where} places layer '{path}', which is not an MoE layer of the model; "
                                "it was made for another model")
        missing = [p for p in plan.selected if p not in self.layers]
        if missing:
            raise PlanError(f"{where} does not place MoE layer '{missing[0]}'; it was made for another model")
        if world_size is not None and world_size != self.world_size:
            raise PlanError(f"{where} is for {self.world_size} ranks but the process group has {world_size}; "
                            f"run sparsify partition --world-size {world_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (plan.json)."""
        return {
            "format": PLACEMENT_FORMAT,
            "version": 1,
            "world_size": self.world_size,
            "num_experts": self.num_experts,
            "equal_experts": self.equal_experts,
            "layers": {p: list(r) for p, r in self.layers.items()},
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the placement") -> "ExpertPlacement":
        """Inverse of `to_dict`."""
        if not isinstance(data, dict) or data.get("format") != PLACEMENT_FORMAT:
            raise PlanError(f"{where} is not an expert placement (made by sparsify partition)")
        try:
            return cls(int(data["world_size"]), int(data["num_experts"]),
                       {str(p): list(r) for p, r in data["layers"].items()},
                       bool(data.get("equal_experts", True)), dict(data.get("report", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"{where} is damaged ({type(err).__name__}: {err}); run sparsify partition again") from None

    @classmethod
    def load(cls, source: "str | Path | dict[str, Any] | ExpertPlacement") -> "ExpertPlacement":
        """A placement from a plan.json path, the dict read from it, or a placement."""
        if isinstance(source, ExpertPlacement):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        data = read_json(source, f"no such placement file: '{source}'", "pass a plan.json written by sparsify partition")
        return cls.from_dict(data, where=f"'{source}'")

    def save(self, path: str | Path, force: bool = False, sources: Sequence = ()) -> Path:
        """Write plan.json atomically (never over one of `sources`, the paths it was made from)."""
        with atomic_file(path, force=force, sources=sources) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)
