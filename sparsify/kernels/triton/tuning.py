"""Block sizes for the Triton kernels: measured once per shape on the GPU, then cached.

A shape key holds the kernel, the dtype, the GEMM's N and K, the expert count and the average
rows per expert rounded up to a power of two (which decides whether tiles should be short, for
decoding, or tall, for prefill and training). The first call with a new key times each
candidate that fits on scratch outputs (replayed from a CUDA graph) and keeps the fastest for
the life of the process. Under `TRITON_INTERPRET=1` (CPU testing) nothing is timed: the small
`INTERPRETER` tiles are used, which keep the interpreted programs few and cheap.

A candidate (`Up`, `Down`, `Wgrad`) is a tile shape, warps and pipeline stages, and for the
first two kernels whether operands are read through TMA descriptors, whether the programs are
persistent, and (first kernel) whether the rows are gathered by a copy to be read through a
descriptor too. `python -m sparsify.kernels.triton.offline` compiles every candidate for an H100
without one and reports whether it fits and spills.

Environment: `SPARSIFY_TRITON_TUNE=0` skips the timing and takes the first candidate that fits
(quick runs of many small shapes, e.g. the test suite on a GPU); `SPARSIFY_TRITON_TUNE_LOG=FILE`
appends one JSON line per timed candidate to FILE (to see how close the runners-up were).
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple, Union

__all__ = ["interpreting", "pick", "candidates", "rows_bucket", "Up", "Down", "Wgrad", "INTERPRETER", "CANDIDATES"]


class Up(NamedTuple):
    """A block configuration of `up_kernel`."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    desc: int = 0  # weights read through TMA descriptors
    persist: int = 0  # 0: a program per tile; 1: a program per multiprocessor looping over tiles; 2: loops flattened
    rows_desc: int = 0  # rows read through a descriptor too (gathered into expert order by a copy first)


class Down(NamedTuple):
    """A block configuration of `down_kernel`."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1  # split-K: programs per output tile, partial sums added atomically
    desc: int = 0  # rows and weights read through TMA descriptors
    persist: int = 0  # as `Up.persist`


class Wgrad(NamedTuple):
    """A block configuration of `wgrad_kernel`."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


_T = Union[Up, Down, Wgrad]
CANDIDATES: dict[str, list[_T]] = {
    "up": [Up(*c) for c in [
        (16, 64, 128, 4, 4, 0), (16, 128, 64, 4, 4, 0), (16, 32, 256, 4, 3, 0), (16, 64, 256, 4, 3, 0),
        (16, 64, 128, 4, 4, 1), (16, 64, 256, 4, 3, 1),
        (32, 64, 64, 4, 4, 0), (64, 64, 64, 4, 4, 0), (64, 128, 64, 4, 4, 0), (64, 256, 64, 8, 3, 0),
        (128, 64, 64, 4, 4, 0), (128, 128, 32, 8, 4, 0), (128, 128, 64, 8, 3, 0), (128, 128, 64, 8, 4, 0),
        (64, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1), (128, 128, 32, 8, 4, 1),
        # small enough for float32 weights of a gated FFN in shared memory, on any GPU
        (16, 32, 64, 4, 2, 0), (64, 64, 32, 4, 2, 0),
        (128, 128, 128, 8, 2, 1), (256, 64, 64, 8, 3, 1),
        # The tiles that led at prefill sizes on an H100, persistent (1; 2: loops flattened) and
        # with the rows gathered by a copy and read through a descriptor; each fits an H100's
        # shared memory without spilling (python -m sparsify.kernels.triton.offline).
        (64, 256, 64, 8, 3, 1, 1, 0), (64, 256, 64, 8, 3, 1, 2, 0), (64, 256, 64, 8, 3, 1, 0, 1),
        (64, 256, 64, 8, 3, 1, 1, 1), (128, 128, 64, 8, 3, 1, 1, 0), (128, 128, 64, 8, 3, 1, 0, 1),
        (128, 128, 64, 8, 3, 1, 1, 1), (128, 128, 64, 8, 3, 1, 2, 1), (128, 128, 64, 8, 4, 1, 0, 1),
    ]],
    "down": [Down(*c) for c in [
        (16, 64, 128, 4, 4, 1, 0), (16, 64, 128, 4, 4, 4, 0), (16, 128, 64, 4, 4, 2, 0), (16, 64, 256, 4, 3, 4, 0),
        (16, 32, 256, 4, 3, 4, 0), (16, 64, 128, 4, 4, 8, 0), (16, 64, 128, 4, 4, 8, 1), (16, 64, 256, 4, 3, 4, 1),
        (32, 64, 64, 4, 4, 1, 0), (64, 64, 64, 4, 4, 1, 0), (64, 128, 64, 4, 4, 1, 0), (128, 64, 64, 4, 4, 1, 0),
        (128, 128, 32, 8, 4, 1, 0), (128, 128, 64, 8, 3, 1, 0), (128, 128, 64, 8, 4, 1, 0),
        (128, 256, 32, 8, 3, 1, 0), (128, 256, 64, 8, 3, 1, 0), (256, 128, 64, 8, 3, 1, 0),
        (128, 128, 64, 8, 4, 1, 1), (128, 256, 64, 8, 3, 1, 1), (128, 256, 64, 8, 4, 1, 1), (256, 128, 64, 8, 3, 1, 1),
        (16, 32, 64, 4, 2, 1, 0), (64, 64, 32, 4, 2, 1, 0), (128, 256, 128, 8, 2, 1, 1),
        # persistent, as for "up"; and a tile small enough for two programs per multiprocessor
        (128, 256, 64, 8, 3, 1, 1, 1), (128, 128, 64, 8, 4, 1, 1, 1), (128, 128, 64, 8, 4, 1, 1, 2),
        (256, 128, 64, 8, 3, 1, 1, 1), (128, 128, 64, 8, 3, 1, 1, 0),
    ]],
    "wgrad": [Wgrad(*c) for c in [(64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3),
                                  (128, 128, 64, 8, 3)]],
}
# Under the interpreter the descriptor path is the default (CI checks it); tests switch the
# pointer path, persistent programs and rows through descriptors on in turn.
INTERPRETER: dict[str, _T] = {"up": Up(16, 32, 32, 1, 1, desc=1), "down": Down(16, 32, 32, 1, 1, split=1, desc=1),
                              "wgrad": Wgrad(32, 32, 16, 1, 1)}

_cache: dict[tuple, _T] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rows_bucket(rows: int, experts: int) -> int:
    """Average rows per expert, rounded up to a power of two (at least 16)."""
    avg = max(1, -(-rows // max(1, experts)))
    return max(16, 1 << (avg - 1).bit_length())


def _allowed(cfg: _T, split_ok: bool, desc_ok: bool, rows_desc_ok: bool) -> _T:
    """`cfg` with what the call cannot use switched off: split-K, TMA descriptors for the weights,
    for the first kernel's rows."""
    if isinstance(cfg, Down) and not split_ok:
        cfg = cfg._replace(split=1)
    if isinstance(cfg, (Up, Down)) and not desc_ok:
        cfg = cfg._replace(desc=0)
    if isinstance(cfg, Up) and not (desc_ok and rows_desc_ok):
        cfg = cfg._replace(rows_desc=0)
    return cfg


def _fits(cfg: _T, bucket: int) -> bool:
    if isinstance(cfg, Wgrad):
        return True
    # tiles much taller than an expert's rows compute padding; tiles short for many rows re-read weights
    return cfg.bm <= max(16, bucket) and (bucket < 128 or cfg.bm >= 64)


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


def candidates(kind: str, bucket: int, split_ok: bool = True, desc_ok: bool = True,
               rows_desc_ok: bool = True, room: Callable[[_T], bool] | None = None) -> list[_T]:
    """The configurations `pick` tries, in order, for kernel `kind` at `bucket` rows per expert;
    `room(cfg)`: whether the tile's pipeline can fit this GPU's shared memory (the others would be
    compiled only to fail at launch)."""
    fits = [c for c in CANDIDATES[kind] if _fits(c, bucket)] or CANDIDATES[kind][:1]
    fits = list(dict.fromkeys(_allowed(c, split_ok, desc_ok, rows_desc_ok) for c in fits))
    if room is None:
        return fits
    return [c for c in fits if room(c)] or fits[:1]


def pick(kind: str, key: tuple, bucket: int, run: Callable[[_T], None], split_ok: bool = True,
         desc_ok: bool = True, rows_desc_ok: bool = True, room: Callable[[_T], bool] | None = None) -> _T:
    """The block configuration for kernel `kind` at shape `key`; `run(cfg)` launches it on
    scratch outputs (only called while tuning). `split_ok`: partial sums may be added atomically
    (split-K); `desc_ok`: the weights (and the second kernel's rows) can be read through TMA
    descriptors; `rows_desc_ok`: the first kernel's rows can be too, once in expert order; `room`:
    see `candidates`."""
    if interpreting():
        return _allowed(INTERPRETER[kind], split_ok, desc_ok, rows_desc_ok)
    full = (kind, *key, bucket, split_ok, desc_ok, rows_desc_ok)
    if full not in _cache:
        fits = candidates(kind, bucket, split_ok, desc_ok, rows_desc_ok, room)
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
                row = {"kind": kind, "key": [str(k) for k in key], "bucket": bucket, "cfg": cfg._asdict(),
                       "ms": None if error else timed[-1][0], "error": error}
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if not timed:
            raise RuntimeError(f"no Triton block configuration of '{kind}' compiles on this GPU for {key}; "
                               f"the last one failed with {error}")
        _cache[full] = min(timed)[1]
    return _cache[full]
