"""How sizes and counts read in everything sparsify prints: one helper each.

Bytes use SI units with a space ("7.91 GB", as disks and `df -H` count them); counts of
parameters use the K / M / B suffixes model cards use ("560K", "7.24B"). Neither imports torch,
so the command line can format without loading it.
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_count"]


def format_bytes(n: float) -> str:
    """1.5e9 -> '1.50 GB'; 512 -> '512 B'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """1234567 -> '1.23M'; 560123 -> '560K'; 7.24e9 -> '7.24B'."""
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"
