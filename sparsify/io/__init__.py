"""Model sources and crash-safe writing."""

from .atomic import atomic_directory, atomic_file, check_output
from .demo import DEMOS, build_demo
from .sources import Source, is_native, load_source, resolve_source

__all__ = ["Source", "load_source", "resolve_source", "is_native", "DEMOS", "build_demo",
           "atomic_directory", "atomic_file", "check_output"]
