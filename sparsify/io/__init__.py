"""Model sources, strict reading, crash-safe writing, integrity records and signal handling."""

from .atomic import atomic_directory, atomic_file, check_output
from .demo import DEMOS, build_demo
from .signals import Interrupted, handle_signals
from .sources import Source, is_native, load_source, resolve_source

__all__ = ["Source", "load_source", "resolve_source", "is_native", "DEMOS", "build_demo",
           "atomic_directory", "atomic_file", "check_output", "Interrupted", "handle_signals"]
