"""The data passed between passes: FFN sites, rejected candidates, and the upcycle plan.

The plan is the seam of the design: analysis passes write it, executors (in-memory rewrite,
streaming conversion, loaders) read it. It is plain data and round-trips through JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .moe.config import MoEConfig

__all__ = ["FFNSite", "Rejected", "UpcyclePlan", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass
class FFNSite:
    """One feed-forward block found in the graph, and how to read its weights.

    `path` is the module the MoE replaces. For an FFN whose two projections live in two sibling
    modules (BERT's `intermediate` and `output.dense`), `path` is the module that computes the
    first half and `exit_path` the output projection, which becomes an identity.
    `weights` maps a role to a parameter name of the source model: w1 (first projection; the gate
    in the gated form), w3 (up projection, gated only), w2 (output projection), and b1/b3/b2 for
    biases. `layout` is "linear" ([out, in], nn.Linear) or "conv1d" ([in, out], GPT-2's Conv1D).
    """

    path: str
    form: str  # "dense" | "gated"
    activation: str
    hidden_size: int
    intermediate_size: int
    weights: dict[str, str]
    layout: str = "linear"
    exit_path: str | None = None
    stack: str = ""
    index: int = 0
    dropout: float = 0.0  # between activation and output projection
    out_dropout: float = 0.0  # after the output projection, inside the replaced module
    causal: bool = False  # in a causal (decoder) stack

    @property
    def has_bias(self) -> bool:
        """True when any projection has a bias."""
        return any(role.startswith("b") for role in self.weights)

    def expert_param_count(self) -> int:
        """Parameters of one expert (one copy of this FFN)."""
        h, i = self.hidden_size, self.intermediate_size
        n = (3 if self.form == "gated" else 2) * h * i
        n += sum(i if r in ("b1", "b3") else h for r in self.weights if r.startswith("b"))
        return n

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FFNSite":
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass
class Rejected:
    """A candidate that looked like an FFN but cannot be replaced, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.reason}"


@dataclass
class UpcyclePlan:
    """What to convert and how: the sites found, those selected, and the MoE settings."""

    sites: list[FFNSite] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    moe: MoEConfig | None = None
    init: dict[str, Any] = field(default_factory=dict)  # noise, router_init_std, seed
    source: dict[str, Any] = field(default_factory=dict)

    def site(self, path: str) -> FFNSite:
        """The site whose module path is `path`."""
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(path)

    @property
    def selected_sites(self) -> list[FFNSite]:
        """Sites that become MoE layers, in graph order."""
        chosen = set(self.selected)
        return [s for s in self.sites if s.path in chosen]

    def stacks(self) -> dict[str, list[FFNSite]]:
        """Sites grouped by stack (encoder, decoder, ...), each list ordered by index."""
        out: dict[str, list[FFNSite]] = {}
        for s in self.sites:
            out.setdefault(s.stack, []).append(s)
        for v in out.values():
            v.sort(key=lambda s: s.index)
        return out

    def param_counts(self, total_dense: int) -> tuple[int, int]:
        """(total, active per token) parameter counts after conversion of a model of `total_dense`."""
        if self.moe is None:
            return total_dense, total_dense
        e, k = self.moe.num_experts, self.moe.top_k
        total = active = total_dense
        for s in self.selected_sites:
            per = s.expert_param_count()
            router = e * s.hidden_size
            total += (e - 1) * per + router
            active += (k - 1) * per + router
        return total, active

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what `sparsify.json` stores under "plan")."""
        return {
            "version": PLAN_VERSION,
            "sites": [s.to_dict() for s in self.sites],
            "rejected": [asdict(r) for r in self.rejected],
            "selected": list(self.selected),
            "moe": self.moe.to_dict() if self.moe else None,
            "init": dict(self.init),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UpcyclePlan":
        """Inverse of `to_dict`."""
        return cls(
            sites=[FFNSite.from_dict(s) for s in data.get("sites", [])],
            rejected=[Rejected(**r) for r in data.get("rejected", [])],
            selected=list(data.get("selected", [])),
            moe=MoEConfig.from_dict(data["moe"]) if data.get("moe") else None,
            init=dict(data.get("init", {})),
            source=dict(data.get("source", {})),
        )
