"""Output formats, one writer each."""

from .base import OutputFormat
from .native import NativeFormat, load_native, read_manifest

__all__ = ["OutputFormat", "NativeFormat", "load_native", "read_manifest"]
