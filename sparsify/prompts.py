"""Prompts per expert, for routers initialised from data (`router_init="prompts"` or
`"embeddings"`), read from a YAML or JSON file:

    # one entry per expert (per router group with granular upcycling), in expert order
    - positive: ["def quicksort(xs):", "import numpy as np"]
      negative: ["Once upon a time"]          # optional
    - positive: ["The patient presented with"]

or the same list under a top-level `experts:` key. Every entry needs at least one positive
prompt; prompts are non-empty strings. A bad file is refused with the line of the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import OptionError

__all__ = ["ExpertPrompts", "PromptSet", "read_prompts", "prompt_set"]

_STR = "tag:yaml.org,2002:str"
_KEYS = ("positive", "negative")


@dataclass
class ExpertPrompts:
    """The prompts of one expert: what should be routed to it, and optionally what should not."""

    positive: list[str]
    negative: list[str] = field(default_factory=list)


@dataclass
class PromptSet:
    """Prompts of every expert, in expert order, and what they were read from (for the plan)."""

    experts: list[ExpertPrompts]
    origin: str
    sha256: str

    def describe(self) -> dict[str, Any]:
        """What `RouterInit.data` records of them."""
        return {"prompts": self.origin, "sha256": self.sha256, "experts": len(self.experts)}


class _Bad(Exception):
    def __init__(self, line: int | None, what: str):
        super().__init__(what)
        self.line, self.what = line, what


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _strings(node: yaml.Node, what: str) -> list[str]:
    if not isinstance(node, yaml.SequenceNode):
        raise _Bad(_line(node), f"{what} must be a list of strings")
    out = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or item.tag != _STR or not item.value.strip():
            raise _Bad(_line(item), f"{what} must hold non-empty strings, got {getattr(item, 'value', item)!r}")
        out.append(item.value)
    return out


def _entries(root: yaml.Node | None) -> list[ExpertPrompts]:
    if root is None:
        raise _Bad(None, "the file is empty; list each expert's prompts")
    if isinstance(root, yaml.MappingNode):
        keys = [k.value for k, _ in root.value]
        if keys != ["experts"]:
            bad = next((k for k, _ in root.value if k.value != "experts"), root)
            raise _Bad(_line(bad), f"unknown key {getattr(bad, 'value', '')!r}; the file is a list of experts' prompts "
                                   "(or that list under 'experts')")
        root = root.value[0][1]
    if not isinstance(root, yaml.SequenceNode) or not root.value:
        raise _Bad(_line(root), "expected a list with one entry of prompts per expert")
    experts = []
    for i, node in enumerate(root.value):
        if not isinstance(node, yaml.MappingNode):
            raise _Bad(_line(node), f"expert {i} must be a mapping with 'positive' (and optionally 'negative') prompts")
        values: dict[str, list[str]] = {}
        for key, value in node.value:
            if key.value not in _KEYS:
                raise _Bad(_line(key), f"expert {i}: unknown key {key.value!r}; the keys are positive, negative")
            values[key.value] = _strings(value, f"expert {i}'s {key.value} prompts")
        if not values.get("positive"):
            raise _Bad(_line(node), f"expert {i} has no positive prompts")
        experts.append(ExpertPrompts(values["positive"], values.get("negative", [])))
    return experts


def read_prompts(path: str | os.PathLike) -> PromptSet:
    """The prompts file at `path` (YAML or JSON, see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OptionError(f"prompts file '{path}' does not exist") from None
    except OSError as err:
        raise OptionError(f"cannot read prompts file '{path}' ({err.strerror})") from None
    try:
        root = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
        experts = _entries(root)
    except UnicodeDecodeError:
        raise OptionError(f"prompts file '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise OptionError(f"prompts file '{path}'{where}: not valid YAML or JSON ({getattr(err, 'problem', None) or err})") from None
    except _Bad as bad:
        where = f", line {bad.line}" if bad.line else ""
        raise OptionError(f"prompts file '{path}'{where}: {bad.what}") from None
    return PromptSet(experts, path.name, hashlib.sha256(raw).hexdigest())


def prompt_set(prompts: str | os.PathLike | PromptSet | Sequence[Any]) -> PromptSet:
    """`prompts` as given to `sparsify.upcycle` / `passes.InitRouter`: a file path, a `PromptSet`,
    or a list with one `ExpertPrompts` (or {"positive": [...], "negative": [...]}) per expert."""
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    if not isinstance(prompts, Sequence) or not prompts:
        raise OptionError(f"prompts must be a file path or a list of each expert's prompts, got {prompts!r}")
    plain = [{"positive": p.positive, "negative": p.negative} if isinstance(p, ExpertPrompts) else p for p in prompts]
    try:
        text = json.dumps(plain, sort_keys=True)
    except TypeError as err:
        raise OptionError(f"prompts must hold each expert's prompts as lists of strings ({err})") from None
    try:
        experts = _entries(yaml.compose(text, Loader=yaml.SafeLoader))
    except _Bad as bad:
        raise OptionError(f"prompts: {bad.what}") from None
    return PromptSet(experts, "prompts given in Python", hashlib.sha256(text.encode()).hexdigest())
