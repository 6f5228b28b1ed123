"""Recipe files: YAML (JSON, a subset of it, reads the same way), parsed with the line of every key.

PyYAML builds the data; the loader here only remembers where each mapping key was written, so
that an error names `moe.yaml:7: decoder.router`, and refuses a key given twice (which PyYAML
would silently resolve to the last value). TOML is not read: `tomllib` reports no positions, so
its errors could not name the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

__all__ = ["read_recipe_file", "write_recipe_file", "RECIPE_SUFFIXES"]

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


class _Duplicate(Exception):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _Mapping(dict):
    """A mapping that knows the line of each of its keys."""

    lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings record their keys' lines."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)  # YAML merge keys (<<) as PyYAML resolves them
    out = _Mapping()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in out
        except TypeError:  # an unhashable key (a list or mapping used as a key)
            raise yaml.constructor.ConstructorError(None, None, "a key must be a name or a layer index",
                                                    key_node.start_mark) from None
        if duplicate:
            raise _Duplicate(key, line)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _plain(data: Any, path: tuple, lines: dict[tuple, int]) -> Any:
    """`data` with plain dicts, and the line of every key path recorded in `lines`."""
    if isinstance(data, _Mapping):
        out = {}
        for key, value in data.items():
            lines[(*path, key)] = data.lines[key]
            out[key] = _plain(value, (*path, key), lines)
        return out
    if isinstance(data, list):
        return [_plain(v, path, lines) for v in data]
    return data


def read_recipe_file(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """(data, lines) of the recipe file at `path`: the mapping it holds, and the line of each key
    path (a tuple of keys from the top). Errors name the file and the line."""
    path = Path(path)
    name = str(path)
    if path.suffix.lower() not in RECIPE_SUFFIXES:
        raise RecipeError(f"{name}: a recipe file is YAML or JSON ({', '.join(RECIPE_SUFFIXES)}); "
                          f"got a {path.suffix or 'suffix-less'} file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{name}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{name}: is a directory, not a recipe file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{name}: not a text file (a recipe is YAML in UTF-8)") from None
    except OSError as err:
        raise RecipeError(f"{name}: cannot be read ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except _Duplicate as dup:
        raise RecipeError(f"{name}:{dup.line}: {dup.key}: given twice; keep one") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{name}{line}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{name}: not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        raise RecipeError(f"{name}: the recipe is empty; give at least the expert count (experts: 8)")
    if not isinstance(data, _Mapping):
        raise RecipeError(f"{name}:1: a recipe is a mapping of keys to values, got a {type(data).__name__}")
    lines: dict[tuple, int] = {}
    return _plain(data, (), lines), lines


def write_recipe_file(data: dict[str, Any], path: str | Path, force: bool = False) -> Path:
    """Write the recipe mapping `data` to `path` as YAML, keys in their order (atomically; an
    existing file is replaced only with `force`); returns the path."""
    from .io.atomic import atomic_file

    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise RecipeError(f"{path}: recipes are written as YAML; name the file .yaml or .yml")
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
