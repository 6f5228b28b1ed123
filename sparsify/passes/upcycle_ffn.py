"""`upcycle-ffn`: turn each selected FFN into a router plus E experts made from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..merge import MERGE_BASES, ExpertSource, average_into, check_compatible, open_sources, source_names
from ..model_recipe import Recipe
from ..moe.config import MoEConfig
from ..rewrite import apply_plan
from .infra import Pass, PassContext, PostconditionError, PreconditionError
from .init_router import InitRouter, check_router_data

__all__ = ["UpcycleFFN"]


class UpcycleFFN(Pass):
    """Record each selected site's `LayerPlan` and rewrite the model's selected FFNs in place.

    Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN
    (plus optional Gaussian `noise` of that std), the router as normal(0, `router_init_std`).
    With `router="topk"`, `normalize=True` and no capacity factor the result returns exactly
    what the dense model returned. The other schemes (`drop_ratio`, `granularity`,
    `shared_fraction`, `split`) are described in `sparsify.recipe`.

    The options are a recipe's keys (`sparsify.model_recipe`); defaults: experts 8 (one per
    `experts_from` source), top_k 2 (1 for switch), router topk, normalize True, dropless,
    noise 0, router_init_std 0.02, seed 0. `recipe=` takes a `sparsify.Recipe` (per stack and
    per layer settings), its mapping, a recipe file or a `LayerRecipe`; options given beside it
    replace its top-level keys. A recipe that states a selection must agree with the one
    `select-layers` made (give it the recipe too).

    Experts from several checkpoints (`sparsify.merge`): `experts_from=[...]`, one source per
    expert (per router group), each a path, hub id, demo name or model; the other weights from
    the model (`merge_base="base"`) or averaged over it and the sources (`"average"`).
    Routers from data (`passes.InitRouter`, run here before the rewrite): `router_init=
    "prompts" | "embeddings"` with `prompts=`, `"kmeans"` with `calibration=`; `tokenizer=`
    where the model's checkpoint has none. `sources` takes sources already opened and checked
    (the streaming executor's); `models` the in-memory models that names in `experts_from` stand
    for.
    """

    name = "upcycle-ffn"

    def __init__(self, experts: int | None = None, top_k: int | None = None, router: str | None = None,
                 normalize: bool | None = None, noise: float | None = None, router_init_std: float | None = None,
                 seed: int | None = None, capacity_factor: float | None = None, recipe: Any = None,
                 merge_base: str | None = None, prompts: Any = None, calibration: str | os.PathLike | None = None,
                 tokenizer: Any = None, sources: dict[str, ExpertSource] | None = None,
                 models: dict[str, Any] | None = None, **options: Any):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise OptionError(f"seed must be an integer, got {seed!r}")
        # In-memory models among experts_from are named (module0, ...) in the recipe and the plan.
        self.given: dict[str, Any] = dict(models or {})
        if options.get("experts_from") is not None:
            entries = options["experts_from"]
            names = source_names(entries)
            self.given = dict(zip(names, entries))
            options["experts_from"] = names
        calibration = str(calibration) if isinstance(calibration, os.PathLike) else calibration
        prompts = str(prompts) if isinstance(prompts, os.PathLike) else prompts
        self.recipe = Recipe.build(recipe, experts=experts, top_k=top_k, router=router, normalize=normalize,
                                   noise=noise, router_init_std=router_init_std, seed=seed,
                                   capacity_factor=capacity_factor, merge_base=merge_base, prompts=prompts,
                                   calibration=calibration, **options)
        self.merge_base = self.recipe.merge_base or "base"
        if self.merge_base not in MERGE_BASES:
            raise OptionError(f"merge_base must be one of {', '.join(MERGE_BASES)}, got {self.merge_base!r}")
        if self.merge_base == "average" and not any(self.recipe.given("experts_from")):
            raise OptionError("merge_base 'average' averages the base with the expert sources; give experts_from")
        self.sources = sources
        kinds = {k for k in self.recipe.given("router_init")}
        check_router_data(kinds, self.recipe.prompts, self.recipe.calibration)
        data = kinds - {"random"}
        self.init_router = InitRouter(None, self.recipe.prompts, self.recipe.calibration, tokenizer) if data else None
        if self.init_router is not None and self.init_router.prompts is not None:
            top = self.recipe.layer_recipe([()])
            rows = top.config.num_experts // top.granularity
            if len(self.init_router.prompts.experts) != rows:
                raise OptionError(f"the prompts list {len(self.init_router.prompts.experts)} experts and the MoE layers "
                                  f"route to {rows}; give one entry of prompts per expert"
                                  + (" (per router group)" if top.granularity > 1 else ""))

    @property
    def seed(self) -> int:
        """Seed of router initialisation, noise and Drop-Upcycling."""
        return self.recipe.seed

    @property
    def config(self) -> MoEConfig:
        """The routing of the layers no stack or layer section of the recipe changes."""
        return self.recipe.layer_recipe([()]).config

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.sites:
            raise PreconditionError("upcycle-ffn needs FFN sites; run find-ffn before it")
        if not ctx.plan.selected:
            raise OptionError("no FFN layer was selected; with --every N the model needs at least N FFNs per stack")

    def plan(self, ctx: PassContext) -> None:
        """Write the layer plans of the selected sites into `ctx.plan` (no rewrite)."""
        plan = ctx.plan
        plan.layers = self.recipe.layer_plans(plan.sites, plan.selected)
        plan.seed = self.recipe.seed
        plan.recipe = self.recipe.to_dict(for_json=True)
        plan.merge_base = self.merge_base
        names = [n for layer in plan.layers.values() for x in layer.experts for n in [x.source] if n != "base"]
        plan.sources = {n: plan.sources.get(n, {"spec": n}) for n in dict.fromkeys(names)}

    def _open(self, ctx: PassContext) -> dict[str, ExpertSource]:
        """The plan's expert sources: those given opened, else opened now and checked against the model."""
        from ..io.sources import fingerprint_files
        from ..merge import ModuleWeights

        names = list(ctx.plan.sources)
        if self.sources is not None:
            missing = [n for n in names if n not in self.sources]
            if missing:
                raise OptionError(f"the plan reads experts from '{missing[0]}', which was not opened")
            return {n: self.sources[n] for n in names}
        opened = open_sources([self.given.get(n, n) for n in names], names)
        loaded_from = Path(getattr(getattr(ctx.model, "config", None), "name_or_path", "") or "")
        check_compatible(ctx.model, ModuleWeights(ctx.model), loaded_from if str(loaded_from) and loaded_from.is_dir() else None,
                         opened)
        for n, s in opened.items():
            ctx.plan.sources[n] = s.provenance(fingerprint_files(s.files) if s.files else None)
        return opened

    def call(self, ctx: PassContext) -> bool:
        self.plan(ctx)
        if self.init_router is not None:
            self.init_router(ctx)  # from the dense base, before anything is rewritten or averaged
        copying = not any(p.device.type == "meta" for p in ctx.model.parameters())
        sources = self._open(ctx) if ctx.plan.sources and copying else {}
        if sources and self.merge_base == "average":
            skip = {name for s in ctx.plan.selected_sites for name in s.weights.values()}
            average_into(ctx.model, skip, [s.weights for s in sources.values()])
        apply_plan(ctx.model, ctx.plan, sources={n: s.weights for n, s in sources.items()})
        return True

    def ensures(self, ctx: PassContext) -> None:
        for site in ctx.plan.selected_sites:
            if type(ctx.model.get_submodule(site.path)).__name__ != "SparseMoE":
                raise PostconditionError(f"upcycle-ffn left '{site.path}' unconverted")
