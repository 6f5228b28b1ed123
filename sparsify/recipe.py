"""Recipes: how each selected FFN becomes an MoE layer.

A `LayerRecipe` holds the options of one MoE layer as a user states them (experts, routing, the
initialisation scheme) and builds the `LayerPlan` for a site, checking the options against that
FFN's shape. The schemes:

- copy (sparse upcycling): every expert a copy of the FFN, optionally with `noise`;
- `drop_ratio` r (Drop-Upcycling): a share r of each expert's neurons re-initialised from the
  weights' own mean and std, a different set per expert;
- `granularity` G (granular / virtual-group upcycling): the FFN's neurons split into G shards,
  expert e holding shard e % G with its output scaled by G, the router's rows repeated per group
  of G; with renormalised top-k, k a multiple of G, the layer equals the dense FFN;
- `shared_fraction` F: a share F of the neurons in one always-on shared expert, the routed
  experts copies of the rest (function-preserving);
- `split` (parameter-neutral): E experts, each 1/E of the neurons, output scaled by E so that the
  renormalised top-k mix estimates the dense FFN without bias; fewer active parameters than the
  dense model, not function-preserving.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Sequence

from .errors import OptionError, PlanError
from .layer_plan import ROUTER_INITS, ExpertInit, LayerPlan, RouterInit
from .moe.config import MoEConfig
from .plan import FFNSite

__all__ = ["LayerRecipe"]


def _number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(x) and (x > low if low_open else x >= low) and (high is None or x <= high)
    if not ok:
        span = f"in ({low}, {high}]" if low_open and high is not None else f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise OptionError(f"{name} must be a finite number {span}, got {value!r}")
    return x


@dataclass
class LayerRecipe:
    """The options of one MoE layer; `build(site, seed)` makes its `LayerPlan`. Validated on
    construction (each option on its own); `build` checks them against the FFN's shape."""

    experts: int = 8
    top_k: int | None = None
    router: str = "topk"
    normalize: bool = True
    capacity_factor: float | None = None
    noise: float = 0.0
    router_init: str = "random"
    router_init_std: float = 0.02
    drop_ratio: float = 0.0
    granularity: int = 1
    shared_fraction: float = 0.0
    split: bool = False
    experts_from: list[str] | None = None
    moe_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.router == "switch" and self.top_k == 2:
            self.top_k = None  # the signature default k=2 does not apply to switch routing (top-1)
        self.noise = _number("noise", self.noise, 0.0)
        self.router_init_std = _number("router_init_std", self.router_init_std, 0.0)
        self.drop_ratio = _number("drop_ratio", self.drop_ratio, 0.0, 1.0)
        self.shared_fraction = _number("shared_fraction", self.shared_fraction, 0.0, 1.0)
        if self.shared_fraction >= 1.0:
            raise OptionError("shared_fraction must be below 1: the routed experts need some of the FFN's neurons")
        if not isinstance(self.granularity, int) or isinstance(self.granularity, bool) or self.granularity < 1:
            raise OptionError(f"granularity must be a positive integer, got {self.granularity!r}")
        if self.router_init not in ROUTER_INITS:
            raise OptionError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        if self.split and self.granularity > 1:
            raise OptionError("split and granularity exclude each other: a split gives every expert its own share of "
                              "the neurons, granular upcycling repeats G shards across router groups")
        self.config = self.moe_config()
        g = self.granularity
        if self.config.num_experts % g or self.config.top_k % g:
            raise OptionError(f"with granularity {g}, experts ({self.config.num_experts}) and top_k "
                              f"({self.config.top_k}) must both be multiples of {g}")
        if self.experts_from is not None:
            names = [str(n) for n in self.experts_from]
            if len(names) * g != self.config.num_experts:
                raise OptionError(f"experts_from names {len(names)} sources for {self.config.num_experts} experts"
                                  + (f" in groups of {g}" if g > 1 else "") + "; give one source per expert")
            self.experts_from = names

    def moe_config(self) -> MoEConfig:
        """The routing settings (validated by `MoEConfig`)."""
        return MoEConfig(num_experts=self.experts, top_k=self.top_k, router=self.router, normalize=self.normalize,
                         capacity_factor=self.capacity_factor, **self.moe_options)

    @property
    def scheme(self) -> str:
        """Short name of the initialisation scheme, for summaries."""
        parts = ["merge" if self.experts_from else "copy"]
        parts += [name for name, on in (("split", self.split), (f"granular{self.granularity}", self.granularity > 1),
                                        ("shared", self.shared_fraction > 0), ("drop", self.drop_ratio > 0),
                                        ("noise", self.noise > 0)) if on]
        return "+".join(parts) if len(parts) > 1 else parts[0]

    def build(self, site: FFNSite) -> LayerPlan:
        """The `LayerPlan` of `site`; refuses options that do not fit its FFN."""
        cfg, g, size = self.config, self.granularity, site.intermediate_size
        shared = None
        start = 0
        if self.shared_fraction > 0:
            s = round(self.shared_fraction * size)
            if not 0 < s < size:
                raise OptionError(f"shared_fraction {self.shared_fraction} of {site.path}'s {size} neurons leaves "
                                  "the shared or the routed experts empty")
            shared = ExpertInit(neurons=(0, s), bias_scale=0.0)  # the routed mix adds the bias once
            start = s
        routed = size - start
        parts = cfg.num_experts if self.split else g
        if routed % parts:
            what = f"{cfg.num_experts} equal experts" if self.split else f"{g} equal shards"
            raise OptionError(f"{site.path}'s {routed} routed neurons do not split into {what}")
        width = routed // parts
        sources = self.experts_from or ["base"] * (cfg.num_experts // g)
        experts = []
        for e in range(cfg.num_experts):
            shard = e if self.split else e % g
            neurons = (start + shard * width, start + (shard + 1) * width)
            experts.append(ExpertInit(
                source=sources[e // g],
                neurons=None if neurons == (0, size) else neurons,
                reinit=self.drop_ratio,
                scale=float(cfg.num_experts if self.split else g),
                noise=self.noise,
            ))
        router = RouterInit(kind=self.router_init, std=self.router_init_std, groups=g)
        try:
            return LayerPlan(cfg, experts, shared=shared, router=router, scheme=self.scheme)
        except PlanError as err:
            raise OptionError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (what `sparsify.json` records)."""
        default = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "moe_options":
                out.update(value)
            elif value != default.get(f.name):
                out[f.name] = value
        out["top_k"] = self.config.top_k
        return out

    @classmethod
    def from_options(cls, experts: int = 8, top_k: int | None = 2, router: str = "topk", normalize: bool = True,
                     capacity_factor: float | None = None, noise: float = 0.0, router_init_std: float = 0.02,
                     drop_ratio: float = 0.0, granularity: int = 1, shared_fraction: float = 0.0, split: bool = False,
                     router_init: str = "random", experts_from: Sequence[str] | None = None,
                     **moe_options: Any) -> "LayerRecipe":
        """A recipe from keyword options (those of `sparsify.upcycle` and `passes.UpcycleFFN`);
        an unknown keyword is refused by name."""
        from .keywords import check_keywords, keyword_names

        covered = {"num_experts", "top_k", "router", "normalize", "capacity_factor"}
        accepted = keyword_names(cls.from_options) + [f.name for f in fields(MoEConfig) if f.name not in covered]
        check_keywords("passes.UpcycleFFN", moe_options, accepted)
        return cls(experts=experts, top_k=top_k, router=router, normalize=normalize, capacity_factor=capacity_factor,
                   noise=noise, router_init=router_init, router_init_std=router_init_std, drop_ratio=drop_ratio,
                   granularity=granularity, shared_fraction=shared_fraction, split=split,
                   experts_from=list(experts_from) if experts_from is not None else None, moe_options=moe_options)
