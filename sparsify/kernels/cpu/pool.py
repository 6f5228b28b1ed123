"""Expert-parallel execution on CPU: each core runs whole expert segments, one BLAS thread each.

With many experts each expert sees few rows (32 experts, 2048 tokens: 64 rows), and a GEMM that
small does not split well across cores: every call pays a fork/join, and the cores pack the same
weight panels in lockstep, so streaming an expert's weights from memory and computing on them
happen one after the other. Giving each core its own expert instead keeps every core busy with
single-threaded GEMMs and overlaps one core's weight streaming with the other's arithmetic.

The worker threads set their *thread-local* MKL and OpenMP thread counts to 1, so the caller's
`torch.get_num_threads()` and every other thread are untouched. Where those controls cannot be
found (a torch built without MKL or without the bundled OpenMP), `parallel_map` runs the items
inline with torch's usual intra-op threads, which is correct, only slower.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

__all__ = ["parallel_map", "expert_parallel_available"]

Item = TypeVar("Item")

_local = threading.local()  # `in_worker` marks pool threads, whose nested calls run inline
_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _load_controls() -> tuple[Callable[[int], int], Callable[[int], None]] | None:
    """(MKL thread-local setter, OpenMP per-thread setter) of the libraries torch itself uses."""
    if not (torch.backends.mkl.is_available() and torch.backends.openmp.is_available()):
        return None
    libdir = Path(torch.__file__).parent / "lib"
    try:
        # The same copies torch calls: MKL is linked into libtorch_cpu, libgomp ships beside it.
        # A system libgomp loaded by name would be a different runtime with its own settings.
        mkl = ctypes.CDLL(str(libdir / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
        gomp = next(iter(sorted(libdir.glob("libgomp*.so*"))), None)
        if gomp is None:
            return None
        omp = ctypes.CDLL(str(gomp)).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
    omp.argtypes, omp.restype = [ctypes.c_int], None
    return mkl, omp


_controls = _load_controls()


def expert_parallel_available() -> bool:
    """True when worker threads can be made single-threaded, which `parallel_map` needs."""
    return _controls is not None


def _init_worker() -> None:
    mkl, omp = _controls  # type: ignore[misc]
    mkl(1)
    omp(1)
    _local.in_worker = True


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        # A forked child (DataLoader worker) inherits the executor object but not its threads.
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            ex = ThreadPoolExecutor(workers, thread_name_prefix="sparsify-cpu", initializer=_init_worker)
            _pool = (os.getpid(), workers, ex)
        return _pool[2]


def parallel_map(fn: Callable[[Item], None], items: Iterable[Item], workers: int | None = None) -> None:
    """Call `fn(item)` for every item, spread over `workers` single-threaded workers.

    Items are handed out one at a time in the given order, so put the largest first (longest
    processing time first keeps the cores finishing together). `workers` defaults to
    `torch.get_num_threads()`. Autograd is off in the workers; inference mode follows the
    caller's. The first exception raised by `fn` is re-raised here.
    """
    items = list(items)
    workers = torch.get_num_threads() if workers is None else workers
    workers = min(workers, len(items))
    inference = torch.is_inference_mode_enabled()
    if workers <= 1 or _controls is None or getattr(_local, "in_worker", False):
        with torch.inference_mode(inference), torch.no_grad():
            for item in items:
                fn(item)
        return
    queue = iter(items)
    take = threading.Lock()

    def drain() -> None:
        with torch.inference_mode(inference), torch.no_grad():
            while True:
                with take:
                    item = next(queue, _DONE)
                if item is _DONE:
                    return
                fn(item)

    executor = _executor(workers)
    futures = [executor.submit(drain) for _ in range(workers)]
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


_DONE = object()
