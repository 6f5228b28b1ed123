"""Output formats, one writer each."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OutputFormat", "NativeFormat", "load_native", "read_manifest"]

_WHERE = {"OutputFormat": ".base", **dict.fromkeys(["NativeFormat", "load_native", "read_manifest"], ".native")}


def __getattr__(name: str) -> Any:
    # Imported on first use: an output's manifest and headers (`formats.manifest`) are read
    # without torch, which the writers import.
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
