"""`upcycle-ffn`: turn each selected FFN into a router plus E experts made from it."""

from __future__ import annotations

from typing import Any

from ..errors import OptionError
from ..model_recipe import Recipe
from ..moe.config import MoEConfig
from ..rewrite import apply_plan
from .infra import Pass, PassContext, PostconditionError, PreconditionError

__all__ = ["UpcycleFFN"]


class UpcycleFFN(Pass):
    """Record each selected site's `LayerPlan` and rewrite the model's selected FFNs in place.

    Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN
    (plus optional Gaussian `noise` of that std), the router as normal(0, `router_init_std`).
    With `router="topk"`, `normalize=True` and no capacity factor the result returns exactly
    what the dense model returned. The other schemes (`drop_ratio`, `granularity`,
    `shared_fraction`, `split`) are described in `sparsify.recipe`.

    The options are a recipe's keys (`sparsify.model_recipe`); defaults: experts 8, top_k 2
    (1 for switch), router topk, normalize True, dropless, noise 0, router_init_std 0.02, seed 0.
    `recipe=` takes a `sparsify.Recipe` (per stack and per layer settings), its mapping, a
    recipe file or a `LayerRecipe`; options given beside it replace its top-level keys. A recipe
    that states a selection must agree with the one `select-layers` made (give it the recipe too).
    """

    name = "upcycle-ffn"

    def __init__(self, experts: int | None = None, top_k: int | None = None, router: str | None = None,
                 normalize: bool | None = None, noise: float | None = None, router_init_std: float | None = None,
                 seed: int | None = None, capacity_factor: float | None = None, recipe: Any = None, **options: Any):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise OptionError(f"seed must be an integer, got {seed!r}")
        self.recipe = Recipe.build(recipe, experts=experts, top_k=top_k, router=router, normalize=normalize,
                                   noise=noise, router_init_std=router_init_std, seed=seed,
                                   capacity_factor=capacity_factor, **options)

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
        ctx.plan.layers = self.recipe.layer_plans(ctx.plan.sites, ctx.plan.selected)
        ctx.plan.seed = self.recipe.seed
        ctx.plan.recipe = self.recipe.to_dict(for_json=True)

    def call(self, ctx: PassContext) -> bool:
        self.plan(ctx)
        apply_plan(ctx.model, ctx.plan)
        return True

    def ensures(self, ctx: PassContext) -> None:
        for site in ctx.plan.selected_sites:
            if type(ctx.model.get_submodule(site.path)).__name__ != "SparseMoE":
                raise PostconditionError(f"upcycle-ffn left '{site.path}' unconverted")
