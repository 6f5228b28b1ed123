"""Packages whose public names are imported on first use (PEP 562's module `__getattr__`).

Importing torch and transformers takes seconds; a package that re-exports names from modules
that import them would make every command pay that, even one that needs none of those names
(`sparsify --help`, `sparsify inspect` of an output).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, where: dict[str, str], public: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose names `where` maps each to the module
    (relative to the package) that defines it; a name mapped to `.name` itself is that module.
    A name is imported when first read, then kept in the package like any other."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where[name], package)
        value = module if where[name] == f".{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
