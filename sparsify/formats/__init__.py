"""Output formats, one writer each."""

from __future__ import annotations

from ..lazy_names import lazy_names

__all__ = ["OutputFormat", "NativeFormat", "load_native", "read_manifest"]

# Imported on first use: an output's manifest and headers (`formats.manifest`, `formats.stored`)
# are read without torch, which the writers import.
__getattr__, __dir__ = lazy_names(__name__, {
    "OutputFormat": ".base", **dict.fromkeys(["NativeFormat", "load_native", "read_manifest"], ".native"),
}, __all__)
