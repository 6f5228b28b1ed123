"""The data passed between passes: FFN sites, rejected candidates, and the upcycle plan.

The plan is the seam of the design: analysis passes write it, executors (in-memory rewrite,
streaming conversion, loaders) read it. It is plain data and round-trips through JSON.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PlanError
from .layer_plan import ExpertInit, LayerPlan, RouterInit
from .moe.config import MoEConfig

if TYPE_CHECKING:  # plans are read where torch is not imported (`sparsify inspect` of an output)
    import torch

__all__ = ["FFNSite", "Rejected", "ExpertInit", "RouterInit", "LayerPlan", "UpcyclePlan", "PLAN_VERSION"]

PLAN_VERSION = 3


@dataclass
class FFNSite:
    """One feed-forward block found in the graph, and how to read its weights.

    `path` is the module the MoE replaces. For an FFN whose pieces are several modules called
    by one layer (BERT's `intermediate` and `output.dense`; BART's `fc1`, `activation_fn`,
    `fc2`), `path` is the module that reads the FFN's input, `exit_path` the output projection
    and `identities` the modules between them (activation, dropout): all become identities.
    `overrides` are attributes of the model ("module.path.attribute" -> value) that the
    rewrite sets: a dropout rate or an activation function that the layer's own forward applies
    between the projections (the MoE applies them instead), or a fast path that would read the
    replaced weights. `weights` maps a role to a parameter name of the source model: w1 (first
    projection; the gate in the gated form), w3 (up projection, gated only), w2 (output
    projection), and b1/b3/b2 for biases. `fused` says, for roles that share one parameter (a
    fused gate/up projection), which part of it they are: role -> [part, parts, "halves" |
    "interleaved"]. `layout` is "linear" ([out, in], nn.Linear), "conv1d" ([in, out], GPT-2's
    Conv1D) or "conv1x1" ([out, in / groups, 1], a 1x1 nn.Conv1d; `groups` per role).
    `feature_axis` is the input's hidden-size axis (1 for channels-first convolutions).
    `calls` lists the further layer indices at which a shared FFN (ALBERT) runs again: one
    module, one MoE, every call. `activation_params` maps a parametrised activation's
    parameters to source parameter names.
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
    identities: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    fused: dict[str, list] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    feature_axis: int = -1
    calls: list[int] = field(default_factory=list)
    activation_params: dict[str, str] = field(default_factory=dict)

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

    def dense_param_count(self) -> int:
        """Parameters of the dense FFN as the source holds them (a grouped convolution holds
        1/groups of the full matrix; an expert holds the full one)."""
        h, i = self.hidden_size, self.intermediate_size
        n = sum(h * i // self.groups.get(r, 1) for r in ("w1", "w2", "w3") if r in self.weights)
        return n + self.expert_param_count() - (3 if self.form == "gated" else 2) * h * i

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @property
    def indices(self) -> list[int]:
        """Every layer index within its stack at which this FFN runs (more than one when shared)."""
        return [self.index, *self.calls]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FFNSite":
        """Inverse of `to_dict`; a field of the wrong kind is a `TypeError` naming it (a damaged
        plan must not reach a forward pass)."""
        if not isinstance(data, dict):
            raise TypeError(f"a site must be an object, got {type(data).__name__}")
        for name, value in data.items():
            kind = _SITE_KINDS.get(name)
            ok = kind is None or _is(value, kind)
            if name == "exit_path" and value is None:
                ok = True
            if ok and name in _SITE_CHECKS:
                ok = _SITE_CHECKS[name](value)
            if not ok:
                raise TypeError(f"site field '{name}' has the wrong kind of value: {value!r}"[:200])
        weights = data.get("weights", {})
        needed = {"w1", "w2", "w3"} if data.get("form") == "gated" else {"w1", "w2"}
        if not needed <= set(weights) or data.get("form") != "gated" and "w3" in weights:
            raise TypeError(f"site field 'weights' does not name the projections of a {data.get('form')} FFN: "
                            f"{sorted(weights)}"[:200])
        return cls(**data)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """`isinstance` for JSON values, where true and false are not numbers."""
    return isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))


def _mapping(keys: Any, values: Any) -> Any:
    return lambda d: all(_is(k, keys) and _is(v, values) for k, v in d.items())


def _items(kind: Any, low: int | None = None) -> Any:
    return lambda xs: all(_is(x, kind) and (low is None or x >= low) for x in xs)


def _fused_part(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 3 and _is(v[0], int) and _is(v[1], int) and 0 <= v[0] < v[1]
            and v[2] in ("halves", "interleaved"))


# What a site's fields must hold beyond their JSON kind: the contents of its containers and the
# range of its numbers. Every value here is read by the rewrite or a forward pass, where a wrong
# one would be a traceback in the middle of a command (found by tests/io/test_fuzz.py).
_SITE_CHECKS: dict[str, Any] = {
    "form": lambda v: v in ("dense", "gated"),
    "layout": lambda v: v in ("linear", "conv1d", "conv1x1"),
    "hidden_size": lambda v: v >= 1,
    "intermediate_size": lambda v: v >= 1,
    "index": lambda v: v >= 0,
    "feature_axis": lambda v: -4 <= v <= -1,
    "dropout": lambda v: math.isfinite(v) and 0.0 <= v < 1.0,
    "out_dropout": lambda v: math.isfinite(v) and 0.0 <= v < 1.0,
    "weights": lambda d: _mapping(str, str)(d) and set(d) <= {"w1", "w2", "w3", "b1", "b2", "b3"},
    "identities": _items(str),
    "calls": _items(int, 0),
    "groups": lambda d: _mapping(str, int)(d) and all(v >= 1 for v in d.values()),
    "activation_params": _mapping(str, str),
    "fused": lambda d: all(isinstance(k, str) and _fused_part(v) for k, v in d.items()),
    "overrides": lambda d: all(isinstance(k, str) for k in d),
}

# The JSON kind of each FFNSite field (a float field also takes an int).
_SITE_KINDS: dict[str, type | tuple[type, ...]] = {
    "path": str, "form": str, "activation": str, "hidden_size": int, "intermediate_size": int, "weights": dict,
    "layout": str, "exit_path": str, "stack": str, "index": int, "dropout": (int, float),
    "out_dropout": (int, float), "causal": bool, "identities": list, "overrides": dict, "fused": dict,
    "groups": dict, "feature_axis": int, "calls": list, "activation_params": dict,
}


@dataclass
class Rejected:
    """A candidate that looked like an FFN but cannot be replaced, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.reason}"



@dataclass
class UpcyclePlan:
    """What to convert and how: the sites found, those selected, and per selected site its
    `LayerPlan` (routing, expert initialisation, router initialisation).

    `sources` maps the names that experts are read from to their provenance ("base" is the
    model being converted); `merge_base` says where the non-FFN weights come from: "base", or
    "average" over the base and every expert source (Branch-Train-MiX). `recipe` records the
    recipe as given. `router_weights` holds data-initialised router weights in memory (the
    written output holds them; they are not part of the JSON form)."""

    sites: list[FFNSite] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    seed: int = 0
    selection: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    merge_base: str = "base"
    source: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    router_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def site(self, path: str) -> FFNSite:
        """The site whose module path is `path`."""
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(path)

    def layer(self, site: FFNSite | str) -> LayerPlan:
        """The `LayerPlan` of a selected site."""
        path = site if isinstance(site, str) else site.path
        try:
            return self.layers[path]
        except KeyError:
            raise PlanError(f"the plan has no MoE settings for '{path}'; run upcycle-ffn to make them") from None

    @property
    def selected_sites(self) -> list[FFNSite]:
        """Sites that become MoE layers, in graph order."""
        chosen = set(self.selected)
        return [s for s in self.sites if s.path in chosen]

    @property
    def moe(self) -> MoEConfig | None:
        """The routing every MoE layer shares; None when there are none or they differ."""
        configs = [self.layers[p].moe for p in self.selected if p in self.layers]
        if not configs or any(c != configs[0] for c in configs[1:]):
            return None
        return configs[0]

    def set_routing(self, config: MoEConfig) -> None:
        """Give every MoE layer the routing `config` (its expert count must stay the same)."""
        for path, layer in self.layers.items():
            if config.num_experts != layer.moe.num_experts:
                raise PlanError(f"{path} has {layer.moe.num_experts} experts; set_routing keeps expert counts")
            layer.moe = config

    def uniform(self) -> str | None:
        """Why the MoE layers are not all alike (routing, expert size, shared expert, router
        groups), as a format with one setting for the whole model needs; None when they are."""
        if not self.selected_sites:
            return "the plan converts no FFN into an MoE layer"
        missing = [p for p in self.selected if p not in self.layers]
        if missing:
            return f"the plan has no MoE settings for '{missing[0]}' (run upcycle-ffn)"
        if self.moe is None:
            return "the MoE layers route differently (the recipe sets routing per layer)"
        first = self.selected_sites[0]
        shape = lambda s: (self.layer(s).expert_size(s), self.layer(s).shared.size(s) if self.layer(s).shared else 0,  # noqa: E731
                           self.layer(s).router.groups)
        for s in self.selected_sites[1:]:
            if shape(s) != shape(first):
                return f"the MoE layers differ in expert size, shared expert or router groups ({first.path}, {s.path})"
        return None

    def stacks(self) -> dict[str, list[FFNSite]]:
        """Sites grouped by stack (encoder, decoder, ...), each list ordered by index."""
        out: dict[str, list[FFNSite]] = {}
        for s in self.sites:
            out.setdefault(s.stack, []).append(s)
        for v in out.values():
            v.sort(key=lambda s: s.index)
        return out

    def why_not_preserving(self) -> str | None:
        """Why the converted model does not return the dense outputs at initialisation (None if
        it does), naming the layer when the layers differ."""
        reasons = {s.path: self.layer(s).why_not_preserving(s) for s in self.selected_sites}
        found = {r for r in reasons.values() if r}
        if self.merge_base != "base":
            return "the non-FFN weights are averaged over several checkpoints"
        if not found:
            return None
        if len(found) == 1 and all(reasons.values()):
            return found.pop()
        path, why = next((p, r) for p, r in reasons.items() if r)
        return f"{path}: {why}"

    def param_counts(self, total_dense: int) -> tuple[int, int]:
        """(total, active per token) parameter counts after conversion of a model of `total_dense`."""
        total = active = total_dense
        for s in self.selected_sites:
            if s.path not in self.layers:
                continue
            dense = s.dense_param_count()
            t, a = self.layer(s).param_counts(s)
            total += t - dense
            active += a - dense
        return total, active

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what `sparsify.json` stores under "plan")."""
        return {
            "version": PLAN_VERSION,
            "sites": [s.to_dict() for s in self.sites],
            "rejected": [asdict(r) for r in self.rejected],
            "selected": list(self.selected),
            "layers": {p: layer.to_dict() for p, layer in self.layers.items()},
            "seed": self.seed,
            "selection": dict(self.selection),
            "sources": {k: dict(v) for k, v in self.sources.items()},
            "merge_base": self.merge_base,
            "source": dict(self.source),
            "recipe": dict(self.recipe),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UpcyclePlan":
        """Inverse of `to_dict`; also reads version 1 plans (one MoE setting for every layer) and
        version 2 plans (sites without the inline, fused and shared forms)."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        try:
            version = int(data.get("version", 1))
            sites = [FFNSite.from_dict(s) for s in data.get("sites", [])]
            rejected = [Rejected(**r) for r in data.get("rejected", [])]
            selected = [str(p) for p in data.get("selected", [])]
        except (TypeError, ValueError, AttributeError) as err:
            raise PlanError(f"the plan's sites are malformed ({err})") from None
        if version > PLAN_VERSION:
            raise PlanError(f"the plan is version {version}, newer than this sparsify reads ({PLAN_VERSION}); upgrade sparsify")
        if version == 1:
            return cls._from_v1(data, sites, rejected, selected)
        layers = data.get("layers", {})
        if not isinstance(layers, dict):
            raise PlanError("the plan's 'layers' must be an object of layer plans")
        return cls(
            sites=sites, rejected=rejected, selected=selected,
            layers={str(p): LayerPlan.from_dict(v) for p, v in layers.items()},
            seed=int(data.get("seed", 0)),
            selection=dict(data.get("selection") or {}),
            sources={str(k): dict(v) for k, v in (data.get("sources") or {}).items()},
            merge_base=str(data.get("merge_base", "base")),
            source=dict(data.get("source") or {}),
            recipe=dict(data.get("recipe") or {}),
        )

    @classmethod
    def _from_v1(cls, data: dict[str, Any], sites: list[FFNSite], rejected: list[Rejected],
                 selected: list[str]) -> "UpcyclePlan":
        init = dict(data.get("init") or {})
        plan = cls(sites=sites, rejected=rejected, selected=selected, seed=int(init.get("seed", 0)),
                   selection={"every": init.get("every"), "layers": init.get("layers")},
                   source=dict(data.get("source") or {}))
        if data.get("moe"):
            moe = MoEConfig.from_dict(data["moe"])
            expert = ExpertInit(noise=float(init.get("noise", 0.0)))
            router = RouterInit(std=float(init.get("router_init_std", 0.02)))
            for path in selected:
                plan.layers[path] = LayerPlan(moe, [expert] * moe.num_experts, router=router,
                                              scheme="copy" if expert.noise == 0 else "copy+noise")
        return plan
