"""Output formats, one writer each."""

from .native import load_native, read_manifest, save_native

__all__ = ["save_native", "load_native", "read_manifest"]
