"""A recipe meeting a model: its section names bound to FFN stacks and modules, its selection
made per stack, and each selected site's options gathered from the sections that apply to it.

A section key names a stack by the name FFN discovery gives (`encoder.block`), or by a dotted
part of it that names no other stack (`encoder`; the friendly alias), or a site by its module
path. Names the model does not have, layer indices out of range, and sections for layers that
are not selected are refused with the key (and line) of the section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import OptionError, RecipeError
from .layer_plan import LayerPlan
from .plan import FFNSite
from .recipe import LayerRecipe
from .recipe_keys import ALL_KEYS, SELECTION_KEYS

if TYPE_CHECKING:
    from .model_recipe import Recipe

__all__ = ["BoundRecipe", "DEFAULT_EVERY", "stack_alias"]

DEFAULT_EVERY = 2  # every other FFN, as in Switch Transformer and the Sparse Upcycling paper

KeyPath = tuple


def _stacks(sites: Sequence[FFNSite]) -> dict[str, list[FFNSite]]:
    out: dict[str, list[FFNSite]] = {}
    for s in sites:
        out.setdefault(s.stack, []).append(s)
    for group in out.values():
        group.sort(key=lambda s: s.index)
    return out


def _part_of(key: str, stack: str) -> bool:
    """True when `key`'s dotted parts are a run of `stack`'s (encoder in encoder.block)."""
    want, have = key.split("."), stack.split(".")
    return any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1))


def stack_alias(stack: str, stacks: Sequence[str]) -> str | None:
    """The first dotted part of `stack` that names no other stack (encoder for encoder.block),
    or None when the full name is the only one."""
    for part in stack.split("."):
        if part != stack and part not in ALL_KEYS and sum(_part_of(part, s) for s in stacks) == 1:
            return part
    return None


def _describe(stacks: Mapping[str, list[FFNSite]]) -> str:
    if not stacks:
        return "it has no FFN sites"
    parts = []
    for name, group in stacks.items():
        alias = stack_alias(name, list(stacks))
        parts.append(f"{name or '<root>'} ({f'{alias}, ' if alias else ''}{len(group)} FFNs)")
    return "its FFN stacks are " + ", ".join(parts)


class BoundRecipe:
    """`recipe` bound to `sites` (a model's FFN sites); made by `Recipe.bind`."""

    def __init__(self, recipe: "Recipe", sites: Sequence[FFNSite]):
        self.recipe, self.sites = recipe, list(sites)
        self.stacks = _stacks(self.sites)
        self.by_path = {s.path: s for s in self.sites}
        self.stack_sections: dict[str, str] = {}  # stack name -> its section key
        self.site_sections: dict[str, str] = {}  # module path -> its section key
        for key in recipe.sections:
            self._bind(key)

    def _bind(self, key: str) -> None:
        if key in self.by_path and key not in self.stacks:
            self.site_sections[key] = key
            return
        if key in self.stacks:
            name = key
        else:
            matches = [name for name in self.stacks if _part_of(key, name)]
            if len(matches) > 1:
                raise self.recipe.error((key,), f"names {len(matches)} FFN stacks ({', '.join(matches)}); "
                                                "write one in full")
            if not matches:
                raise self.recipe.error((key,), f"no FFN stack or module of this name in the model; "
                                                f"{_describe(self.stacks)}")
            name = matches[0]
        if name in self.stack_sections:
            raise self.recipe.error((key,), f"names stack {name}, as '{self.stack_sections[name]}' does; "
                                            "merge the two sections")
        self.stack_sections[name] = key

    def _selection(self) -> dict[str, tuple[KeyPath, dict[str, Any]]]:
        """Per stack, where its selection is set (a key path; () for the default) and what it is."""
        data = self.recipe.to_dict()
        top = {k: data[k] for k in SELECTION_KEYS if k in data}
        out = {}
        for name in self.stacks:
            key = self.stack_sections.get(name)
            own = {k: data[key][k] for k in SELECTION_KEYS if key is not None and k in data[key]}
            if own:
                out[name] = ((key, next(iter(own))), own)
            elif top:
                out[name] = ((next(iter(top)),), top)
            else:
                out[name] = ((), {"every": DEFAULT_EVERY})
        return out

    def select(self) -> tuple[list[str], dict[str, Any]]:
        """(paths of the sites to convert, in site order; the selection as `plan.selection`
        records it). Within a stack, FFN j is chosen when `j % every == every - 1`, or when j is
        in `layers`; top-level `layers` may name indices that only the longer stacks have."""
        selection = self._selection()
        on_top = [name for name, (path, _) in selection.items() if path[:1] == ("layers",)]
        if on_top:
            largest = max(len(self.stacks[n]) for n in on_top)
            bad = [j for j in selection[on_top[0]][1]["layers"] if j >= largest]
            if bad:
                counts = ", ".join(f"{len(self.stacks[n])} in {n or 'the model'}" for n in on_top)
                raise self.recipe.error(("layers",), f"{','.join(map(str, bad))} out of range: the FFN stacks have "
                                                     f"{counts} (numbered from 0)")
        chosen: set[str] = set()
        for name, (path, sel) in selection.items():
            group = self.stacks[name]
            if "layers" in sel:
                bad = [j for j in sel["layers"] if j >= len(group)]
                if bad and len(path) > 1:
                    raise self.recipe.error(path, f"{','.join(map(str, bad))} out of range: {name} has {len(group)} "
                                                  "FFNs (numbered from 0)")
                chosen |= {s.path for s in group if s.index in set(sel["layers"])}
            else:
                chosen |= {s.path for s in group if s.index % sel["every"] == sel["every"] - 1}
        kinds = [sel for _, sel in selection.values()]
        if all(k == kinds[0] for k in kinds):
            record = {"every": None, "layers": None, **(kinds[0] if kinds else {})}
        else:
            record = {"every": None, "layers": None, "stacks": {n: dict(sel) for n, (_, sel) in selection.items()}}
        return [s.path for s in self.sites if s.path in chosen], record

    def chains(self, selected: Sequence[str]) -> dict[str, list[KeyPath]]:
        """Per selected site, the sections that apply to it, least specific first; refuses
        sections that name a layer out of range or not selected."""
        data, chosen = self.recipe.to_dict(), set(selected)

        def picked(name: str) -> str:
            return ", ".join(str(s.index) for s in self.stacks[name] if s.path in chosen) or "none"

        for name, key in self.stack_sections.items():
            group = self.stacks[name]
            for index in (k for k in data[key] if isinstance(k, int)):
                if index >= len(group):
                    raise self.recipe.error((key, index), f"out of range: {name} has {len(group)} FFNs "
                                                          "(numbered from 0)")
                if group[index].path not in chosen:
                    raise self.recipe.error((key, index), f"layer {index} of {name} is not selected (it selects "
                                                          f"{picked(name)}); add it to that stack's layers")
        for path, key in self.site_sections.items():
            for k in SELECTION_KEYS:
                if k in data[key]:
                    raise self.recipe.error((key, k), "selection (every, layers) is set per stack or at the top "
                                                      "level, not per module")
            if path not in chosen:
                stack = self.by_path[path].stack
                raise self.recipe.error((key,), f"this FFN is not selected ({stack or 'the model'} selects "
                                                f"{picked(stack)}); select it in its stack's layers")
        out = {}
        for path in selected:
            site = self.by_path[path]
            chain: list[KeyPath] = [()]
            key = self.stack_sections.get(site.stack)
            if key is not None:
                chain.append((key,))
                if site.index in data[key]:
                    chain.append((key, site.index))
            if path in self.site_sections:
                chain.append((self.site_sections[path],))
            out[path] = chain
        return out

    def layer_recipes(self, selected: Sequence[str] | None = None) -> dict[str, LayerRecipe]:
        """The `LayerRecipe` of each selected site (`selected` defaults to `select()`; when given,
        a recipe that states a selection must agree with it); refuses expert-choice routing on a
        causal (decoder) layer."""
        if selected is None:
            selected = self.select()[0]
        elif self.recipe.states_selection:
            own = self.select()[0]
            if set(own) != set(selected):
                raise RecipeError(f"the recipe selects {len(own)} FFNs, but {len(selected)} were selected before it "
                                  "(select-layers); give the recipe to SelectLayers(recipe=...) too, or drop its "
                                  "every / layers")
        out = {}
        for path, chain in self.chains(selected).items():
            recipe = self.recipe.layer_recipe(chain)
            if recipe.config.router == "expert-choice" and self.by_path[path].causal:
                where = next((p for p in reversed(chain) if "router" in self.recipe.options_at(p)), ())
                raise self.recipe.error((*where, "router"), f"expert-choice cannot be used on the causal (decoder) "
                                                            f"layer '{path}': experts would choose tokens using later "
                                                            "tokens; route that stack with topk or switch (a decoder "
                                                            "section with router: topk), or select encoder layers only")
            out[path] = recipe
        return out

    def layer_plans(self, selected: Sequence[str] | None = None) -> dict[str, LayerPlan]:
        """The `LayerPlan` of each selected site: what `passes.UpcycleFFN` writes into a plan."""
        recipes = self.layer_recipes(selected)
        chains = self.chains(list(recipes))
        out = {}
        for path, recipe in recipes.items():
            try:
                out[path] = recipe.build(self.by_path[path])
            except OptionError as err:
                raise self.recipe.section_error(chains[path][-1], str(err)) from None
        return out
