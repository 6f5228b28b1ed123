"""Command-line interface (typer + rich)."""

from .main import app, main

__all__ = ["app", "main"]
