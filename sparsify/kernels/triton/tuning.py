"""Block sizes for the Triton kernels: measured once per shape on the GPU, then cached.

A shape key holds the kernel, the dtype, the GEMM's N and K, the expert count and the average
rows per expert rounded up to a power of two (which decides whether tiles should be short, for
decoding, or tall, for prefill and training). The first call with a new key times each
candidate that fits on scratch outputs (replayed from a CUDA graph) and keeps the fastest for
the life of the process. Under `TRITON_INTERPRET=1` (CPU testing) nothing is timed: the small
`INTERPRETER` tiles are used, which keep the interpreted programs few and cheap.

Environment: `SPARSIFY_TRITON_TUNE=0` skips the timing and takes the first candidate that fits
(quick runs of many small shapes, e.g. the test suite on a GPU); `SPARSIFY_TRITON_TUNE_LOG=FILE`
appends one JSON line per timed candidate to FILE (to see how close the runners-up were).
"""

from __future__ import annotations

import json
import os
from typing import Callable

__all__ = ["interpreting", "pick", "rows_bucket", "INTERPRETER", "CANDIDATES"]

_T = tuple[int, ...]
CANDIDATES: dict[str, list[_T]] = {
    # (BM, BN, BK, num_warps, num_stages, TMA descriptors)
    "up": [
        (16, 64, 128, 4, 4, 0), (16, 128, 64, 4, 4, 0), (16, 32, 256, 4, 3, 0), (16, 64, 256, 4, 3, 0),
        (16, 64, 128, 4, 4, 1), (16, 64, 256, 4, 3, 1),
        (32, 64, 64, 4, 4, 0), (64, 64, 64, 4, 4, 0), (64, 128, 64, 4, 4, 0), (64, 256, 64, 8, 3, 0),
        (128, 64, 64, 4, 4, 0), (128, 128, 32, 8, 4, 0), (128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 0),
        (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1), (128, 128, 32, 8, 4, 1),
        # small enough for float32 weights of a gated FFN in shared memory, on any GPU
        (16, 32, 64, 4, 2, 0), (64, 64, 32, 4, 2, 0),
        (128, 128, 128, 8, 2, 1), (256, 64, 64, 8, 3, 1), (64, 256, 64, 8, 4, 1), (64, 256, 128, 8, 2, 1),
    ],
    # (BM, BN, BK, num_warps, num_stages, SPLIT_K, TMA descriptors)
    "down": [
        (16, 64, 128, 4, 4, 1, 0), (16, 64, 128, 4, 4, 4, 0), (16, 128, 64, 4, 4, 2, 0), (16, 64, 256, 4, 3, 4, 0),
        (16, 32, 256, 4, 3, 4, 0), (16, 64, 128, 4, 4, 8, 0), (16, 64, 128, 4, 4, 8, 1), (16, 64, 256, 4, 3, 4, 1),
        (32, 64, 64, 4, 4, 1, 0), (64, 64, 64, 4, 4, 1, 0), (64, 128, 64, 4, 4, 1, 0), (128, 64, 64, 4, 4, 1, 0),
        (128, 128, 32, 8, 4, 1, 0), (128, 128, 64, 8, 3, 1, 0), (128, 128, 64, 8, 4, 1, 0),
        (128, 256, 32, 8, 3, 1, 0), (128, 256, 64, 8, 3, 1, 0), (256, 128, 64, 8, 3, 1, 0),
        (128, 128, 64, 8, 4, 1, 1), (128, 256, 64, 8, 3, 1, 1), (128, 256, 64, 8, 4, 1, 1), (256, 128, 64, 8, 3, 1, 1),
        (16, 32, 64, 4, 2, 1, 0), (64, 64, 32, 4, 2, 1, 0), (128, 256, 128, 8, 2, 1, 1),
    ],
    "wgrad": [(64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)],
}
# Under the interpreter the descriptor path is the default (CI checks it); a test declares the
# operands unfit for descriptors to check the pointer path too.
INTERPRETER: dict[str, _T] = {"up": (16, 32, 32, 1, 1, 1), "down": (16, 32, 32, 1, 1, 1, 1), "wgrad": (32, 32, 16, 1, 1)}

_cache: dict[tuple, _T] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rows_bucket(rows: int, experts: int) -> int:
    """Average rows per expert, rounded up to a power of two (at least 16)."""
    avg = max(1, -(-rows // max(1, experts)))
    return max(16, 1 << (avg - 1).bit_length())


def _allowed(kind: str, cfg: _T, split_ok: bool, desc_ok: bool) -> _T:
    """`cfg` with split-K and TMA descriptors switched off where the call cannot use them."""
    cfg = list(cfg)
    if kind == "down" and not split_ok:
        cfg[5] = 1
    if kind in ("up", "down") and not desc_ok:
        cfg[-1] = 0
    return tuple(cfg)


def _fits(kind: str, cfg: _T, bucket: int) -> bool:
    if kind == "wgrad":
        return True
    # tiles much taller than an expert's rows compute padding; tiles short for many rows re-read weights
    bm = cfg[0]
    return bm <= max(16, bucket) and (bucket < 128 or bm >= 64)


def _time(run: Callable[[], None]) -> float:
    """Median milliseconds of `run` on the GPU. Replayed from a CUDA graph where it can be
    captured, so that small shapes are timed on the device rather than by the host's launch
    overhead; else `do_bench`."""
    from triton.testing import do_bench, do_bench_cudagraph

    run()  # compile and load outside any capture
    try:
        return do_bench_cudagraph(run, rep=20, return_mode="median")
    except Exception:  # noqa: BLE001 - not capturable here: time on the stream instead
        return do_bench(run, warmup=5, rep=20, return_mode="median")


def pick(kind: str, key: tuple, bucket: int, run: Callable[[_T], None], split_ok: bool = True,
         desc_ok: bool = True) -> _T:
    """The block configuration for kernel `kind` at shape `key`; `run(cfg)` launches it on
    scratch outputs (only called while tuning). `split_ok`: partial sums may be added atomically
    (split-K); `desc_ok`: the operands can be read through TMA descriptors."""
    if interpreting():
        return _allowed(kind, INTERPRETER[kind], split_ok, desc_ok)
    full = (kind, *key, bucket, split_ok, desc_ok)
    if full not in _cache:
        fits = [c for c in CANDIDATES[kind] if _fits(kind, c, bucket)] or CANDIDATES[kind][:1]
        fits = list(dict.fromkeys(_allowed(kind, c, split_ok, desc_ok) for c in fits))
        quick = os.environ.get("SPARSIFY_TRITON_TUNE", "1") == "0"
        log = os.environ.get("SPARSIFY_TRITON_TUNE_LOG")
        timed = []
        for cfg in fits:
            error = None
            try:
                if quick:  # the first candidate that compiles and runs here
                    run(cfg)
                    timed.append((0.0, cfg))
                    break
                timed.append((_time(lambda: run(cfg)), cfg))
            except Exception as err:  # a tile that exceeds shared memory or registers on this GPU: skip it
                error = f"{type(err).__name__}: {str(err)[:200]}"
            if log:
                row = {"kind": kind, "key": [str(k) for k in key], "bucket": bucket, "cfg": cfg,
                       "ms": None if error else timed[-1][0], "error": error}
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if not timed:
            raise RuntimeError(f"no Triton block configuration of '{kind}' compiles on this GPU for {key}; "
                               f"the last one failed with {error}")
        _cache[full] = min(timed)[1]
    return _cache[full]
