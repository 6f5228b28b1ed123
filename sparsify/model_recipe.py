"""`Recipe`: how a whole model is upcycled, per stack and per layer.

A recipe is a mapping whose keys are the keyword names of `sparsify.upcycle` (see
`sparsify.recipe_keys`):

    experts: 32                  # top level: the defaults of every MoE layer, and the selection
    every: 2
    encoder:                     # a stack, by the name FFN discovery gives (encoder.block) or a
      router: expert-choice      #   dotted part of it that names one stack (encoder)
      capacity_factor: 2.0
    decoder:
      top_k: 2
      3: {experts: 16}           # a layer of that stack, by its index within the stack
    decoder.block.5.layer.2.DenseReluDense: {top_k: 1}   # a layer by module path

A layer's options are the top level's, then its stack section's, then its layer section's, then
its module path section's, each replacing the one before. Selection (`every` or `layers`) is set
at the top level and may be replaced per stack (`layers: []` converts none of a stack); a layer or
module section must name a selected layer. Options given beside a recipe (keyword arguments, CLI
flags) replace its top-level keys; stack and layer sections keep precedence over them.

The same recipe is a Python object, a YAML file (`Recipe.load`, `save`) and the `recipe` of a
plan in `sparsify.json`; errors name the key, and in a file its line (`moe.yaml:7:
decoder.router: must be one of topk, switch, expert-choice, got 'foo'`). Keys and values are
checked on construction, before any model is loaded; stack names, module paths and layer indices
when the recipe meets a model's FFN sites (`select`, `layer_recipes`, `layer_plans`).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import OptionError, RecipeError
from .layer_plan import LayerPlan
from .plan import FFNSite
from .recipe import LayerRecipe
from .recipe_file import read_recipe_file, write_recipe_file
from .recipe_keys import ALL_KEYS, LAYER_KEYS, MODEL_KEYS, SELECTION_KEYS, check_key, describe

if TYPE_CHECKING:
    from .recipe_sites import BoundRecipe

__all__ = ["Recipe"]

KeyPath = tuple  # a key path from the top of the recipe: ("decoder", 3, "top_k")


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def _index(key: Any) -> int | None:
    """A layer index written as a key: 3 (YAML) or "3" (JSON, TOML-like writers)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _keys_not_flags(message: str) -> str:
    # LayerRecipe and MoEConfig speak of CLI flags (--top-k); in a recipe the key is top_k.
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_") if m[1].replace("-", "_") in ALL_KEYS else m[0],
                  message)


class Recipe:
    """How each FFN of a model becomes an MoE layer: defaults, sections per stack, per layer and
    per module path, and the selection per stack (the module docstring shows the form).

    `Recipe(mapping, **keys)` takes the file's mapping and/or its keys as keyword arguments:
    `Recipe(experts=32, every=2, encoder={"router": "expert-choice", "capacity_factor": 2.0},
    decoder={"top_k": 2})`. `Recipe.load(path)` reads a YAML (or JSON) file. Everything is
    validated on construction (`RecipeError`, naming the key and, for a file, the line)."""

    def __init__(self, data: Mapping[str, Any] | None = None, /, **keys: Any):
        if data is not None and not isinstance(data, Mapping):
            raise RecipeError(f"a recipe is a mapping of keys to values, got {type(data).__name__}")
        self._setup({**dict(data or {}), **keys}, None, {})

    # construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], file: str | None = None,
                  lines: Mapping[KeyPath, int] | None = None) -> "Recipe":
        """A recipe from its mapping (`to_dict`, a plan's `recipe`); `file` and `lines` (key path
        -> line) let errors point into the file the mapping was read from."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{file + ': ' if file else ''}a recipe is a mapping of keys to values, "
                              f"got {type(data).__name__}")
        recipe = cls.__new__(cls)
        where = {path: f"{file}:{line}" for path, line in (lines or {}).items()} if file else {}
        recipe._setup(dict(data), file, where)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """The recipe in the YAML (or JSON) file at `path`."""
        data, lines = read_recipe_file(path)
        return cls.from_dict(data, file=str(path), lines=lines)

    @classmethod
    def build(cls, recipe: "Recipe | LayerRecipe | Mapping[str, Any] | str | Path | None" = None,
              flags: bool = False, **options: Any) -> "Recipe":
        """`recipe` (a Recipe, a LayerRecipe, a mapping, a file path, or None for the defaults)
        with `options` replacing its top-level keys; options that are None are not given. With
        `flags`, errors about the options name them as CLI flags (--top-k)."""
        if recipe is None:
            base = cls()
        elif isinstance(recipe, Recipe):
            base = recipe
        elif isinstance(recipe, LayerRecipe):
            base = cls(recipe.to_dict())
        elif isinstance(recipe, Mapping):
            base = cls(recipe)
        elif isinstance(recipe, (str, Path)):
            base = cls.load(recipe)
        else:
            raise RecipeError(f"recipe must be a sparsify.Recipe, a mapping or a recipe file path, "
                              f"got {type(recipe).__name__}")
        given = {k: v for k, v in options.items() if v is not None}
        return base.with_options(given, flags=flags) if given else base

    def with_options(self, options: Mapping[str, Any], flags: bool = False) -> "Recipe":
        """A copy whose top-level keys `options` replace (`every` and `layers` replace each
        other); with `flags`, errors about them name CLI flags."""
        data, where = copy.deepcopy(self._data), dict(self._where)
        for key, value in options.items():
            for replaced in ({"every", "layers"} if key in SELECTION_KEYS else {key}):
                data.pop(replaced, None)
                where = {p: w for p, w in where.items() if p[:1] != (replaced,)}
            data[key] = value
            if flags:
                where[(key,)] = _flag(key)
        recipe = Recipe.__new__(Recipe)
        recipe._setup(data, self.file, where)
        return recipe

    def with_defaults(self, options: Mapping[str, Any]) -> "Recipe":
        """A copy with `options` at the top level where the recipe does not set them (an output
        format's implied settings: mixtral converts every layer, switch routes top-1). Keys that
        go together (every / layers; router / top_k) are filled only when none of them is set."""
        groups = [set(SELECTION_KEYS), {"router", "top_k"}]
        missing = {}
        for key, value in options.items():
            group = next((g for g in groups if key in g), {key})
            if not any(k in self._data for k in group):
                missing[key] = value
        return self.with_options(missing) if missing else self

    def _setup(self, data: dict[str, Any], file: str | None, where: dict[KeyPath, str]) -> None:
        self.file = file
        self._raw_where = where
        self._where: dict[KeyPath, str] = {}
        self._data = self._validate(data)
        self._check_combinations()

    # errors --------------------------------------------------------------------------------

    def error(self, path: KeyPath, message: str) -> RecipeError:
        """`message` about the key at `path`: 'moe.yaml:7: decoder.router: must be ...' for a key
        of a file, '--router must be ...' for a CLI flag, 'decoder.router: must be ...' for a
        keyword argument."""
        where = self._where.get(path)
        key = _dotted(path)
        if where is not None and where.startswith("--"):
            return RecipeError(f"{where} {message}")
        if where is not None:
            return RecipeError(f"{where}: {key}: {message}")
        if not path:
            return RecipeError(f"{self.file}: {message}" if self.file else message)
        return RecipeError(f"{key}: {message}")

    def _locate(self, raw: KeyPath, path: KeyPath) -> None:
        if raw in self._raw_where:
            self._where[path] = self._raw_where[raw]

    # validation ----------------------------------------------------------------------------

    def _unknown(self, path: KeyPath, key: Any) -> RecipeError:
        guess = _guess(key, list(ALL_KEYS))
        tail = f"; recipe keys are {describe()}, or a stack or module path with a mapping of options"
        if path not in self._where:  # a keyword argument
            return RecipeError(f"unknown option '{key}'{guess}{tail}")
        return self.error(path, f"unknown key{guess}{tail}")

    def _value(self, path: KeyPath, key: str, value: Any) -> Any:
        try:
            return check_key(key, value)
        except ValueError as err:
            raise self.error(path, str(err)) from None

    def _validate(self, data: dict[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, value in data.items():
            path = (key,)
            self._locate(path, path)
            if isinstance(key, str) and key in ALL_KEYS:
                out[key] = self._value(path, key, value)
            elif _index(key) is not None:
                raise self.error(path, f"a layer index belongs in a stack section (e.g. decoder: {{{key}: {{...}}}})")
            elif isinstance(key, str) and key and isinstance(value, Mapping):
                out[key] = self._section(path, value, stack=True)
            elif isinstance(key, str) and key:
                raise self._unknown(path, key)
            else:
                raise self.error(path, "a key must be an option, a stack name or a module path")
        if "every" in out and "layers" in out:
            raise self.error(("layers",), "give either every or layers, not both")
        return out

    def _section(self, path: KeyPath, data: Mapping[Any, Any], stack: bool) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, value in data.items():
            raw = (*path, key)
            index = _index(key)
            norm = (*path, index) if index is not None else raw
            self._locate(raw, norm)
            if isinstance(key, str) and key in LAYER_KEYS:
                out[key] = self._value(norm, key, value)
            elif isinstance(key, str) and key in SELECTION_KEYS:
                if not stack:
                    raise self.error(norm, "selection (every, layers) is set per stack or at the top level, not per layer")
                out[key] = self._value(norm, key, value)
            elif isinstance(key, str) and key in MODEL_KEYS:
                raise self.error(norm, "applies to the whole conversion; set it at the top level of the recipe")
            elif index is not None and stack:
                if not isinstance(value, Mapping):
                    raise self.error(norm, f"a layer section is a mapping of options, got {value!r}")
                if index in out:
                    raise self.error(norm, "given twice; keep one")
                out[index] = self._section(norm, value, stack=False)
            elif index is not None:
                raise self.error(norm, "layer sections do not nest; give the layer in its stack's section")
            else:
                allowed = list(LAYER_KEYS) + (list(SELECTION_KEYS) if stack else [])
                hint = "; a section takes " + ", ".join(allowed) + (" and layer indices" if stack else "")
                raise self.error(norm, f"unknown key{_guess(key, allowed)}{hint}")
        if "every" in out and "layers" in out:
            raise self.error((*path, "layers"), "give either every or layers, not both")
        return out

    def _check_combinations(self) -> None:
        """Each section with what it inherits must make a valid layer (top_k <= experts, ...);
        checked now, before any model is loaded."""
        self.layer_recipe([()])
        for key, section in self.sections.items():
            self.layer_recipe([(), (key,)])
            for index in (k for k in section if isinstance(k, int)):
                self.layer_recipe([(), (key,), (key, index)])

    def options_at(self, path: KeyPath) -> dict[str, Any]:
        """The layer options written in the section at `path` (() for the top level)."""
        node: Any = self._data
        for key in path:
            node = node[key]
        return {k: v for k, v in node.items() if isinstance(k, str) and k in LAYER_KEYS}

    def layer_recipe(self, chain: list[KeyPath]) -> LayerRecipe:
        """The LayerRecipe of the sections in `chain` (the last one wins); errors name the last."""
        options: dict[str, Any] = {}
        for path in chain:
            options.update(self.options_at(path))
        try:
            return LayerRecipe.from_options(**options)
        except OptionError as err:
            raise self.section_error(chain[-1], str(err)) from None

    def section_error(self, path: KeyPath, message: str) -> RecipeError:
        """A `LayerRecipe` / `MoEConfig` error about the section at `path` (its options and what
        they inherit). Their messages name CLI flags; those stay where the options are flags."""
        if path:
            return self.error(path, _keys_not_flags(message))
        if any(w.startswith("--") for p, w in self._where.items() if len(p) == 1):
            return RecipeError(message)
        message = _keys_not_flags(message)
        if self.file is None:
            return RecipeError(message)
        # the top level has no line of its own: point at the first of its keys the message names
        named = [k for k in re.findall(r"[a-z_]+", message) if (k,) in self._where and k in LAYER_KEYS]
        return RecipeError(f"{self._where[(named[0],)] if named else self.file}: {message}")

    # the recipe's parts ----------------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        """The top-level layer options (the defaults of every MoE layer)."""
        return self.options_at(())

    @property
    def sections(self) -> dict[str, dict[Any, Any]]:
        """Stack and module path sections, by the key they are written under."""
        return {k: v for k, v in self._data.items() if k not in ALL_KEYS}

    @property
    def seed(self) -> int:
        """Seed of router initialisation, noise and Drop-Upcycling (default 0)."""
        return int(self._data.get("seed", 0))

    @property
    def merge_base(self) -> str | None:
        """Where the non-FFN weights come from with experts from several checkpoints (None: unset)."""
        return self._data.get("merge_base")

    @property
    def prompts(self) -> Any:
        """Prompts for data-initialised routers: a file path or the prompts inline (None: unset)."""
        return self._data.get("prompts")

    @property
    def calibration(self) -> str | None:
        """Calibration text file for k-means router initialisation (None: unset)."""
        return self._data.get("calibration")

    @property
    def states_selection(self) -> bool:
        """True when the recipe says which layers to convert (every / layers anywhere)."""
        return any(k in self._data for k in SELECTION_KEYS) or any(
            k in section for section in self.sections.values() for k in SELECTION_KEYS)

    def given(self, key: str) -> list[Any]:
        """Every value `key` is given anywhere in the recipe (top level and sections), for checks
        an executor can make before it reads the model (ONNX graphs have no shared experts)."""
        out = []

        def walk(node: Mapping[Any, Any]) -> None:
            if key in node:
                out.append(node[key])
            for value in node.values():
                if isinstance(value, Mapping):
                    walk(value)

        walk(self._data)
        return out

    def to_dict(self, for_json: bool = False) -> dict[Any, Any]:
        """The recipe as a mapping, the form of its file. Layer indices are integer keys, or
        with `for_json` strings (as JSON holds them, in `plan.recipe`); `from_dict` reads both."""
        data = copy.deepcopy(self._data)
        return _json_keys(data) if for_json else data

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the recipe to a YAML file (`Recipe.load` reads it back)."""
        return write_recipe_file(self.to_dict(), path, force=force)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and _canonical(self._data) == _canonical(other._data)

    def __repr__(self) -> str:
        return f"Recipe({self._data!r})"

    # meeting a model -------------------------------------------------------------------------

    def bind(self, sites: Sequence[FFNSite]) -> "BoundRecipe":
        """The recipe bound to a model's FFN sites: stack names, module paths and layer indices
        resolved (refused when the model has no such stack, module or layer)."""
        from .recipe_sites import BoundRecipe

        return BoundRecipe(self, sites)

    def select(self, sites: Sequence[FFNSite]) -> tuple[list[str], dict[str, Any]]:
        """(paths of the sites to convert, the selection as `plan.selection` records it); see
        `BoundRecipe.select`."""
        return self.bind(sites).select()

    def layer_recipes(self, sites: Sequence[FFNSite], selected: Sequence[str] | None = None) -> dict[str, LayerRecipe]:
        """The `LayerRecipe` of each selected site; see `BoundRecipe.layer_recipes`."""
        return self.bind(sites).layer_recipes(selected)

    def layer_plans(self, sites: Sequence[FFNSite], selected: Sequence[str] | None = None) -> dict[str, LayerPlan]:
        """The `LayerPlan` of each selected site; see `BoundRecipe.layer_plans`."""
        return self.bind(sites).layer_plans(selected)


def _guess(key: Any, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _json_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k) if isinstance(k, int) else k: _json_keys(v) for k, v in data.items()}
    return data


def _canonical(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {(_index(k) if _index(k) is not None else k): _canonical(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_canonical(v) for v in data]
    return data
