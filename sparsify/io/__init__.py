"""Model sources, strict reading, crash-safe writing, integrity records and signal handling."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Source", "load_source", "resolve_source", "is_native", "DEMOS", "build_demo",
           "atomic_directory", "atomic_file", "check_output", "Interrupted", "handle_signals"]

_WHERE = {
    **dict.fromkeys(["Source", "load_source", "resolve_source", "is_native"], ".sources"),
    **dict.fromkeys(["DEMOS", "build_demo"], ".demo"),
    **dict.fromkeys(["atomic_directory", "atomic_file", "check_output"], ".atomic"),
    **dict.fromkeys(["Interrupted", "handle_signals"], ".signals"),
}


def __getattr__(name: str) -> Any:
    # Imported on first use: the command line reads `io.demo` and `io.atomic` without torch.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
