"""`select-layers`: choose which FFN sites become MoE layers."""

from __future__ import annotations

from typing import Any, Sequence

from ..model_recipe import Recipe
from .infra import Pass, PassContext, PreconditionError

__all__ = ["SelectLayers"]


class SelectLayers(Pass):
    """Select the FFNs to convert. Within each stack, FFN number j (0-based) is chosen when
    `j % every == every - 1` (every=2, the default: 1, 3, 5, ..., as in Switch Transformer), or
    when j is in `layers`. With `recipe` (a `sparsify.Recipe`, its mapping, or a recipe file) the
    selection is the recipe's, per stack; `every` / `layers` given beside it replace its
    top-level selection."""

    name = "select-layers"

    def __init__(self, every: int | None = None, layers: Sequence[int] | None = None, recipe: Any = None):
        # One description for every path: the selection is a recipe's, even when given as every / layers.
        self.every, self.layers = every, layers
        self.recipe = Recipe.build(recipe, every=every, layers=list(layers) if layers is not None else None)

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.sites:
            raise PreconditionError("select-layers needs FFN sites; run find-ffn before it")

    def call(self, ctx: PassContext) -> bool:
        ctx.plan.selected, ctx.plan.selection = self.recipe.select(ctx.plan.sites)
        return False

    def __repr__(self) -> str:
        if self.layers is not None:
            return f"SelectLayers(layers={self.layers})"
        if self.every is not None:
            return f"SelectLayers(every={self.every})"
        return f"SelectLayers(recipe={self.recipe!r})"
