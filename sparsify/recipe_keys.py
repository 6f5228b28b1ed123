"""The keys a recipe may hold, each with the type and range its value must have.

A recipe (`sparsify.model_recipe.Recipe`, or a recipe file) is a mapping whose keys are the
keyword names of `sparsify.upcycle` / `passes.UpcycleFFN`. Three kinds of keys:

- layer keys (`LAYER_KEYS`): the options of one MoE layer (`sparsify.recipe.LayerRecipe` and the
  extra `MoEConfig` fields); allowed at the top level, in a stack section and in a layer section;
- selection keys (`SELECTION_KEYS`): `every` / `layers`; at the top level and in stack sections;
- model keys (`MODEL_KEYS`): settings of the whole conversion (seed; and the multi-checkpoint
  and data-driven router options, whose meaning belongs to the passes that read them); top level
  only.

Each check takes the value and returns it normalised, or raises `ValueError` with the part of the
message after the key ("must be one of topk, switch, expert-choice, got 'foo'"). The checks are
written here rather than with a schema library because the ranges are those `LayerRecipe` and
`MoEConfig` enforce, and a recipe error must name the key, which their messages (about CLI flags)
do not; cross-key rules (top_k <= experts, granularity divides both) stay in those classes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .layer_plan import ROUTER_INITS
from .moe.config import ROUTER_KINDS

__all__ = ["LAYER_KEYS", "SELECTION_KEYS", "MODEL_KEYS", "ALL_KEYS", "check_key", "describe"]

Check = Callable[[Any], Any]


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, bool) else str(value).lower()


def _integer(low: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer{f' of at least {low}' if low is not None else ''}, got {_shown(value)}")
        if low is not None and value < low:
            raise ValueError(f"must be an integer of at least {low}, got {value}")
        return value
    return check


def _number(low: float, high: float | None = None, low_open: bool = False) -> Check:
    span = f"in [{low:g}, {high:g}]" if high is not None else (f"above {low:g}" if low_open else f"of at least {low:g}")

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number {span}, got {_shown(value)}")
        x = float(value)
        ok = math.isfinite(x) and (x > low if low_open else x >= low)
        ok = ok and (high is None or x <= high)
        if not ok:
            raise ValueError(f"must be a finite number {span}, got {_shown(value)}")
        return x
    return check


def _optional(check: Check, none_means: str) -> Check:
    def optional(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as err:
            raise ValueError(f"{err} (or null for {none_means})") from None
    return optional


def _choice(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise ValueError(f"must be one of {', '.join(options)}, got {_shown(value)}")
        return value
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_shown(value)}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_shown(value)}")
    return value


def _names(value: Any) -> list[str]:
    if isinstance(value, str):  # the CLI's comma-separated form
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a non-empty list of checkpoint names or paths, got {_shown(value)}")
    return list(value)


def _indices(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"must be a list of FFN indices like [1, 3, 5], got {_shown(value)}")
    if any(v < 0 for v in value):
        raise ValueError(f"must hold FFN indices of 0 or more, got {_shown(value)}")
    return sorted(set(value))


def _prompts(value: Any) -> Any:
    # A prompts file, or the prompts inline; their structure is checked by the router-init pass.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, dict)) and value:
        return value
    raise ValueError(f"must be a prompts file path or a non-empty list of prompts per expert, got {_shown(value)}")


LAYER_KEYS: dict[str, Check] = {
    "experts": _integer(2),
    "top_k": _optional(_integer(1), "the default: 2, or 1 for switch"),
    "router": _choice(ROUTER_KINDS),
    "normalize": _boolean,
    "capacity_factor": _optional(_number(0.0, low_open=True), "dropless"),
    "noise": _number(0.0),
    "router_init": _choice(ROUTER_INITS),
    "router_init_std": _number(0.0),
    "drop_ratio": _number(0.0, 1.0),
    "granularity": _integer(1),
    "shared_fraction": _number(0.0, 1.0),  # 1 itself is refused by LayerRecipe, with the reason
    "split": _boolean,
    "experts_from": _names,
    "jitter": _number(0.0),
    "aux_loss_coef": _number(0.0),
    "z_loss_coef": _number(0.0),
    "router_dtype": _choice(("float32", "float64")),
}
SELECTION_KEYS: dict[str, Check] = {"every": _integer(1), "layers": _indices}
MODEL_KEYS: dict[str, Check] = {
    "seed": _integer(),
    "merge_base": _text,
    "prompts": _prompts,
    "calibration": _text,
}
ALL_KEYS: dict[str, Check] = {**LAYER_KEYS, **SELECTION_KEYS, **MODEL_KEYS}


def check_key(key: str, value: Any) -> Any:
    """`value` normalised for `key` (a known key), or `ValueError` saying what it must be."""
    return ALL_KEYS[key](value)


def describe() -> str:
    """The known keys, for an 'unknown key' message."""
    return ", ".join(ALL_KEYS)
