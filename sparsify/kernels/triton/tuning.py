"""Block sizes for the Triton kernels: measured once per shape on the GPU, then cached.

A shape key holds the kernel, the dtype, the GEMM's N and K, the expert count and the average
rows per expert rounded up to a power of two (which decides whether tiles should be short, for
decoding, or tall, for prefill and training). The first call with a new key times each
candidate that fits with `triton.testing.do_bench` on scratch outputs and keeps the fastest for
the life of the process. Under `TRITON_INTERPRET=1` (CPU testing) nothing is timed: the small
`INTERPRETER` tiles are used, which keep the interpreted programs few and cheap.
"""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["interpreting", "pick", "rows_bucket", "INTERPRETER", "CANDIDATES"]

# (BM, BN, BK, num_warps, num_stages[, SPLIT_K])
_T = tuple[int, ...]
CANDIDATES: dict[str, list[_T]] = {
    "up": [
        (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3),
    ],
    "down": [
        (16, 64, 128, 4, 4, 1), (16, 64, 128, 4, 4, 4), (16, 128, 64, 4, 4, 2), (32, 64, 64, 4, 4, 1),
        (64, 64, 64, 4, 4, 1), (64, 128, 64, 4, 4, 1), (128, 64, 64, 4, 4, 1), (128, 128, 32, 8, 4, 1),
        (128, 128, 64, 8, 3, 1), (128, 256, 32, 8, 3, 1),
    ],
    "wgrad": [(64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)],
}
INTERPRETER: dict[str, _T] = {"up": (16, 32, 32, 1, 1), "down": (16, 32, 32, 1, 1, 1), "wgrad": (32, 32, 16, 1, 1)}

_cache: dict[tuple, _T] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rows_bucket(rows: int, experts: int) -> int:
    """Average rows per expert, rounded up to a power of two (at least 16)."""
    avg = max(1, -(-rows // max(1, experts)))
    return max(16, 1 << (avg - 1).bit_length())


def _fits(kind: str, cfg: _T, bucket: int, split_ok: bool) -> bool:
    bm = cfg[0]
    if kind == "wgrad":
        return True
    if len(cfg) > 5 and cfg[5] > 1 and not split_ok:
        return False
    # tiles much taller than an expert's rows compute padding; tiles short for many rows re-read weights
    return bm <= max(16, bucket) and (bucket < 128 or bm >= 64)


def pick(kind: str, key: tuple, bucket: int, run: Callable[[_T], None], split_ok: bool = True) -> _T:
    """The block configuration for kernel `kind` at shape `key`; `run(cfg)` launches it on
    scratch outputs (only called while tuning)."""
    if interpreting():
        return INTERPRETER[kind]
    full = (kind, *key, bucket, split_ok)
    if full not in _cache:
        from triton.testing import do_bench

        fits = [c for c in CANDIDATES[kind] if _fits(kind, c, bucket, split_ok)] or CANDIDATES[kind][:1]
        timed = []
        for cfg in fits:
            try:
                timed.append((do_bench(lambda: run(cfg), warmup=5, rep=20), cfg))
            except Exception:  # a tile that exceeds shared memory or registers on this GPU: skip it
                continue
        if not timed:
            raise RuntimeError(f"no Triton block configuration of '{kind}' compiles on this GPU for {key}")
        _cache[full] = min(timed)[1]
    return _cache[full]
