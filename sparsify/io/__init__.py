"""Model sources, strict reading, crash-safe writing, integrity records and signal handling."""

from __future__ import annotations

from ..lazy_names import lazy_names

__all__ = ["Source", "load_source", "resolve_source", "is_native", "DEMOS", "build_demo",
           "atomic_directory", "atomic_file", "check_output", "Interrupted", "handle_signals"]

# Imported on first use: the command line reads `io.demo` and `io.atomic` without torch.
__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["Source", "load_source", "resolve_source", "is_native"], ".sources"),
    **dict.fromkeys(["DEMOS", "build_demo"], ".demo"),
    **dict.fromkeys(["atomic_directory", "atomic_file", "check_output"], ".atomic"),
    **dict.fromkeys(["Interrupted", "handle_signals"], ".signals"),
}, __all__)
