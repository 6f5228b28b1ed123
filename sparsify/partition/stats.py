"""`RoutingStats`: how a model's routers used their experts on calibration text.

Per MoE layer: the tokens routed, the (token, expert) assignments each expert received, and
the co-activation counts (how many tokens chose both expert i and expert j). The planner
balances the first and keeps strongly co-activated experts on one rank, which saves all-to-all
traffic: a token is sent once to each rank that holds any of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError, SourceError
from ..plan import UpcyclePlan
from .jsonfile import read_json

__all__ = ["LayerStats", "RoutingStats", "STATS_FORMAT"]

STATS_FORMAT = "sparsify-routing-stats"


@dataclass
class LayerStats:
    """Routing counts of one MoE layer. `coactivation[i][j]` (i != j) counts tokens that chose
    both i and j; the diagonal equals `expert_tokens`."""

    tokens: int
    expert_tokens: list[int]
    coactivation: list[list[int]]

    @classmethod
    def empty(cls, num_experts: int) -> "LayerStats":
        """No tokens seen yet."""
        return cls(0, [0] * num_experts, [[0] * num_experts for _ in range(num_experts)])

    def add(self, token_idx: torch.Tensor, expert_idx: torch.Tensor, num_tokens: int) -> None:
        """Count one batch of (token, expert) routing pairs over `num_tokens` tokens."""
        e = len(self.expert_tokens)
        chosen = torch.zeros(num_tokens, e, dtype=torch.float64)
        chosen[token_idx.cpu(), expert_idx.cpu()] = 1.0
        # chosen.T @ chosen counts, for each pair of experts, the tokens that picked both.
        co = (chosen.t() @ chosen).round().to(torch.int64).tolist()
        self.tokens += num_tokens
        self.expert_tokens = [a + b for a, b in zip(self.expert_tokens, torch.bincount(expert_idx.cpu(), minlength=e).tolist())]
        self.coactivation = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(self.coactivation, co)]

    @property
    def load_share(self) -> list[float]:
        """Each expert's share of the layer's assignments (sums to 1; uniform when empty)."""
        total = sum(self.expert_tokens)
        e = len(self.expert_tokens)
        return [n / total for n in self.expert_tokens] if total else [1.0 / e] * e


@dataclass
class RoutingStats:
    """Routing statistics of every MoE layer of one model, keyed by the layer's module path."""

    num_experts: int
    top_k: int
    layers: dict[str, LayerStats] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def check_matches(self, plan: UpcyclePlan, where: str = "the stats") -> None:
        """Raise `PlanError` unless these stats describe the MoE layers of `plan`."""
        counts = {plan.layer(p).moe.num_experts for p in plan.selected if p in plan.layers}
        if counts != {self.num_experts}:
            have = "/".join(map(str, sorted(counts))) or "no"
            raise PlanError(f"{where} count {self.num_experts} experts per layer but the model has {have}; "
                            "profile this model with sparsify profile")
        missing = [p for p in plan.selected if p not in self.layers]
        extra = [p for p in self.layers if p not in set(plan.selected)]
        if missing or extra:
            name = (missing or extra)[0]
            what = "lack MoE layer" if missing else "describe layer"
            tail = "" if missing else ", which is not an MoE layer of the model"
            raise PlanError(f"{where} {what} '{name}'{tail}; they were made for another model, "
                            "profile this one with sparsify profile")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "format": STATS_FORMAT,
            "version": 1,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "calibration": dict(self.calibration),
            "layers": {
                path: {"tokens": s.tokens, "expert_tokens": s.expert_tokens, "coactivation": s.coactivation}
                for path, s in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "stats") -> "RoutingStats":
        """Inverse of `to_dict`, validating shapes."""
        if data.get("format") != STATS_FORMAT:
            raise SourceError(f"{where} is not a routing-statistics file (made by sparsify profile)")
        try:
            e = int(data["num_experts"])
            layers = {}
            for path, s in data["layers"].items():
                layer = LayerStats(int(s["tokens"]), [int(n) for n in s["expert_tokens"]],
                                   [[int(n) for n in row] for row in s["coactivation"]])
                if len(layer.expert_tokens) != e or len(layer.coactivation) != e or any(len(r) != e for r in layer.coactivation):
                    raise ValueError(f"layer '{path}' does not have {e} experts")
                layers[path] = layer
            return cls(e, int(data["top_k"]), layers, dict(data.get("calibration", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"{where} is damaged ({err}); run sparsify profile again") from None

    @classmethod
    def load(cls, path: str | Path) -> "RoutingStats":
        """Read a stats file written by `sparsify profile`."""
        data = read_json(path, f"no such stats file: '{path}'", "pass a file written by sparsify profile")
        return cls.from_dict(data, where=f"'{path}'")
