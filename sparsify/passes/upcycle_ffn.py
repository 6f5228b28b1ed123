"""`upcycle-ffn`: turn each selected FFN into a router plus E experts made from it."""

from __future__ import annotations

from typing import Any

from ..errors import OptionError
from ..recipe import LayerRecipe
from ..rewrite import apply_plan
from .infra import Pass, PassContext, PostconditionError, PreconditionError

__all__ = ["UpcycleFFN"]


class UpcycleFFN(Pass):
    """Record each selected site's `LayerPlan` and rewrite the model's selected FFNs in place.

    Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN
    (plus optional Gaussian `noise` of that std), the router as normal(0, `router_init_std`).
    With `router="topk"`, `normalize=True` and no capacity factor the result returns exactly
    what the dense model returned. The other schemes (`drop_ratio`, `granularity`,
    `shared_fraction`, `split`) are described in `sparsify.recipe`; `recipe=` takes a ready
    `LayerRecipe` instead of the keyword options.
    """

    name = "upcycle-ffn"

    def __init__(self, experts: int = 8, top_k: int | None = 2, router: str = "topk", normalize: bool = True,
                 noise: float = 0.0, router_init_std: float = 0.02, seed: int = 0,
                 capacity_factor: float | None = None, recipe: LayerRecipe | None = None, **options: Any):
        self.recipe = recipe or LayerRecipe.from_options(
            experts=experts, top_k=top_k, router=router, normalize=normalize, capacity_factor=capacity_factor,
            noise=noise, router_init_std=router_init_std, **options)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise OptionError(f"seed must be an integer, got {seed!r}")
        self.seed = seed

    @property
    def config(self):
        """The routing settings of the layers this pass makes."""
        return self.recipe.config

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.sites:
            raise PreconditionError("upcycle-ffn needs FFN sites; run find-ffn before it")
        if not ctx.plan.selected:
            raise OptionError("no FFN layer was selected; with --every N the model needs at least N FFNs per stack")
        if self.config.router == "expert-choice":
            causal = [s.path for s in ctx.plan.selected_sites if s.causal]
            if causal:
                raise OptionError(
                    f"--router expert-choice cannot be used on the causal (decoder) layer '{causal[0]}': "
                    "experts would choose tokens using later tokens; use topk or switch, or select encoder layers only"
                )

    def plan(self, ctx: PassContext) -> None:
        """Write the layer plans of the selected sites into `ctx.plan` (no rewrite)."""
        ctx.plan.seed = self.seed
        ctx.plan.layers = {s.path: self.recipe.build(s) for s in ctx.plan.selected_sites}
        ctx.plan.recipe = self.recipe.to_dict()

    def call(self, ctx: PassContext) -> bool:
        self.plan(ctx)
        apply_plan(ctx.model, ctx.plan)
        return True

    def ensures(self, ctx: PassContext) -> None:
        for site in ctx.plan.selected_sites:
            if type(ctx.model.get_submodule(site.path)).__name__ != "SparseMoE":
                raise PostconditionError(f"upcycle-ffn left '{site.path}' unconverted")
