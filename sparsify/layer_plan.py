"""One MoE layer of a plan: its routing, how each expert is made from the dense FFN, and how its
router starts. `UpcyclePlan` (sparsify.plan) holds one `LayerPlan` per selected site; every
executor (in memory, streaming, the Hugging Face formats, ONNX, the expert-parallel loader) reads
them, and a recipe (sparsify.recipe) is what builds them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .errors import PlanError
from .moe.config import MoEConfig

if TYPE_CHECKING:
    from .plan import FFNSite

__all__ = ["ExpertInit", "RouterInit", "LayerPlan", "ROUTER_INITS"]


def _finite(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """`value` as a float, refused unless finite and within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (low is not None and x < low) or (high is not None and x > high):
        bounds = f" between {low} and {high}" if high is not None else (f" of at least {low}" if low is not None else "")
        raise PlanError(f"{name} must be a finite number{bounds}, got {value!r}")
    return x


@dataclass
class ExpertInit:
    """How one expert's weights are made from a dense FFN; the defaults make an exact copy.

    `source` names the checkpoint the FFN is read from ("base", or a name in the plan's
    `sources`). `neurons` [start, stop) keeps a range of the FFN's intermediate neurons: a shard
    (granular upcycling), a share (a parameter-neutral split), the routed rest beside a shared
    expert. `reinit` is the share of the kept neurons drawn afresh from the original weights' mean
    and std (Drop-Upcycling), a different set per expert. `scale` multiplies the output
    projection's weights, `bias_scale` its bias; `noise` is the std of Gaussian noise added to
    the weights. The formula that applies all of this is `sparsify.init.expert_weight`.
    """

    source: str = "base"
    neurons: tuple[int, int] | None = None
    reinit: float = 0.0
    scale: float = 1.0
    bias_scale: float = 1.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise PlanError(f"an expert's source must name a checkpoint, got {self.source!r}")
        if self.neurons is not None:
            try:
                start, stop = (int(n) for n in self.neurons)
            except (TypeError, ValueError):
                raise PlanError(f"an expert's neurons must be [start, stop], got {self.neurons!r}") from None
            if not 0 <= start < stop:
                raise PlanError(f"an expert's neurons [start, stop) must satisfy 0 <= start < stop, got {self.neurons!r}")
            self.neurons = (start, stop)
        self.reinit = _finite("the re-initialised share (drop ratio)", self.reinit, 0.0, 1.0)
        self.scale = _finite("an expert's output scale", self.scale)
        self.bias_scale = _finite("an expert's bias scale", self.bias_scale)
        self.noise = _finite("the expert noise std", self.noise, 0.0)

    def span(self, site: FFNSite) -> tuple[int, int]:
        """The [start, stop) of `site`'s intermediate neurons this expert holds."""
        start, stop = self.neurons or (0, site.intermediate_size)
        if stop > site.intermediate_size:
            raise PlanError(f"an expert of {site.path} holds neurons up to {stop}, but the FFN has {site.intermediate_size}")
        return start, stop

    def size(self, site: FFNSite) -> int:
        """Intermediate neurons this expert holds."""
        start, stop = self.span(site)
        return stop - start

    def to_dict(self) -> dict[str, Any]:
        """JSON form: only the fields that differ from an exact copy."""
        default = ExpertInit()
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}
        if "neurons" in out:
            out["neurons"] = list(out["neurons"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertInit":
        """Inverse of `to_dict`."""
        if not isinstance(data, dict):
            raise PlanError(f"an expert's initialisation must be an object, got {data!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PlanError(f"unknown expert field '{unknown[0]}'; known: {', '.join(sorted(names))}")
        return cls(**data)


ROUTER_INITS = ("random", "prompts", "embeddings", "kmeans")


@dataclass
class RouterInit:
    """How a router's weights start. `random`: normal(0, std). The data-derived kinds (prompts,
    embeddings, kmeans) are computed by a pass before writing, which records in `data` what they
    were computed from. With `groups` G > 1, the router has E / G distinct rows, each repeated G
    times (experts e = j*G .. j*G+G-1 share row j): exact ties make top-k pick whole groups, which
    is what makes granular upcycling function-preserving."""

    kind: str = "random"
    std: float = 0.02
    groups: int = 1
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_INITS:
            raise PlanError(f"router initialisation must be one of {', '.join(ROUTER_INITS)}, got {self.kind!r}")
        self.std = _finite("the router init std", self.std, 0.0)
        if not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 1:
            raise PlanError(f"router groups must be a positive integer, got {self.groups!r}")
        if not isinstance(self.data, dict):
            raise PlanError(f"a router's data record must be an object, got {self.data!r}"[:200])

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RouterInit":
        """Inverse of `to_dict`."""
        if not isinstance(data, dict):
            raise PlanError(f"a router initialisation must be an object, got {data!r}")
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


@dataclass
class LayerPlan:
    """One MoE layer: its routing, how each routed expert (and the optional always-on shared
    expert) is made from the dense FFN, and how its router starts. `scheme` names the recipe
    that made it (copy, drop, granular, shared, split, merge), for summaries."""

    moe: MoEConfig
    experts: list[ExpertInit]
    shared: ExpertInit | None = None
    router: RouterInit = field(default_factory=RouterInit)
    scheme: str = "copy"

    def __post_init__(self) -> None:
        if len(self.experts) != self.moe.num_experts:
            raise PlanError(f"a layer plan lists {len(self.experts)} experts but routes to {self.moe.num_experts}")
        if self.moe.num_experts % self.router.groups:
            raise PlanError(f"{self.moe.num_experts} experts cannot form router groups of {self.router.groups}")

    def expert_size(self, site: FFNSite) -> int:
        """Intermediate size of the routed experts (one stacked tensor holds them all)."""
        sizes = {x.size(site) for x in self.experts}
        if len(sizes) != 1:
            raise PlanError(f"the experts of {site.path} hold different numbers of neurons ({sorted(sizes)}); "
                            "routed experts must all have one size")
        return sizes.pop()

    def sources(self) -> set[str]:
        """Names of the checkpoints this layer's experts are read from."""
        return {x.source for x in [*self.experts, *([self.shared] if self.shared else [])]}

    def why_not_preserving(self, site: FFNSite) -> str | None:
        """Why this layer does not return the dense FFN's output at initialisation (None: it does).

        Exact when the routing is renormalised top-k without drops and, in every router group,
        the members' neurons partition the routed neurons at scale G (the group size), the shared
        expert holds the rest at scale 1, and the biases add up to one copy."""
        why = self.moe.why_not_preserving()
        if why:
            return why
        everything = [*self.experts, *([self.shared] if self.shared else [])]
        if any(x.noise > 0 for x in everything):
            return "noise perturbs the expert copies"
        if any(x.reinit > 0 for x in everything):
            return "Drop-Upcycling re-initialises part of each expert's neurons"
        if any(x.source != "base" for x in everything):
            return "experts come from other checkpoints than the base"
        g = self.router.groups
        shared = set(range(*self.shared.span(site))) if self.shared else set()
        routed = set(range(site.intermediate_size)) - shared
        shared_bias = self.shared.bias_scale if self.shared else 0.0
        if self.shared and (self.shared.scale != 1.0 or len(shared) != self.shared.size(site)):
            return "the shared expert is scaled"
        for j in range(0, len(self.experts), g):
            group = self.experts[j: j + g]
            held = [n for x in group for n in range(*x.span(site))]
            if sorted(held) != sorted(routed) or any(x.scale != g for x in group):
                return ("each expert holds a share of the FFN's neurons, so the chosen experts compute only part "
                        "of the dense FFN (a parameter-neutral split)")
            if not math.isclose(sum(x.bias_scale for x in group) / g + shared_bias, 1.0, abs_tol=1e-12):
                return "the output biases do not add up to the dense FFN's"
        return None

    def param_counts(self, site: FFNSite) -> tuple[int, int]:
        """(total, active per token) parameters of this layer, router included."""
        per_neuron = (3 if site.form == "gated" else 2) * site.hidden_size
        per_neuron += sum(1 for r in ("b1", "b3") if r in site.weights)
        b2 = site.hidden_size if "b2" in site.weights else 0
        expert = per_neuron * self.expert_size(site) + b2
        shared = per_neuron * self.shared.size(site) + b2 if self.shared else 0
        router = self.moe.num_experts * site.hidden_size
        return self.moe.num_experts * expert + shared + router, self.moe.top_k * expert + shared + router

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "moe": self.moe.to_dict(),
            "experts": [x.to_dict() for x in self.experts],
            "shared": self.shared.to_dict() if self.shared else None,
            "router": self.router.to_dict(),
            "scheme": self.scheme,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        """Inverse of `to_dict`."""
        if not isinstance(data, dict) or not isinstance(data.get("moe"), dict) or not isinstance(data.get("experts"), list):
            raise PlanError("a layer plan must be an object with 'moe' and 'experts'")
        return cls(
            moe=MoEConfig.from_dict(data["moe"]),
            experts=[ExpertInit.from_dict(x) for x in data["experts"]],
            shared=ExpertInit.from_dict(data["shared"]) if data.get("shared") else None,
            router=RouterInit.from_dict(data.get("router") or {}),
            scheme=str(data.get("scheme", "copy")),
        )
