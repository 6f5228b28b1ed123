"""The cpu backend's own float32 GEMM for inference (`moe_gemm.cpp`, AVX-512), built on first use.

An expert segment has few rows (2048 tokens over 32 experts: 64 each), and oneDNN runs GEMMs
that small at about 0.85 of its speed on thousands of rows: every weight is read from memory
once per forward, and its kernel waits for each new panel of them. `moe_gemm.cpp` prefetches the
next panel while it multiplies the current one, and reads and writes rows through index arrays
(the dispatch gather and the top-1 combine scatter ride along). It needs the experts' weights
packed into its panel layout: a second copy, made once per weight and cached until the weight
changes (as `gemm.packed_experts` does for oneDNN), in transparent huge pages where Linux allows.

The library is compiled with the C++ compiler on the PATH (`$CXX`, else `c++`, `g++`) into a
per-user cache (`$SPARSIFY_CACHE`, else `~/.cache/sparsify`), keyed by the source's hash, and
loaded with ctypes, whose calls release the GIL. Without x86-64 Linux, AVX-512 or a compiler,
`available()` is False and the backend keeps to oneDNN/MKL; `SPARSIFY_NATIVE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .gemm import cached_packing

__all__ = ["available", "packed", "Packed", "gemm", "gemm_at", "add_rows", "add_rows_at", "parallel_for",
           "PANEL"]

PANEL = 64  # output columns per packed panel (NR in moe_gemm.cpp)
_ABI = 2
_SOURCE = Path(__file__).with_name("moe_gemm.cpp")
_FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"]

_TASK = ctypes.CFUNCTYPE(None, ctypes.c_int64)
# PyGILState_Ensure/Release, PyEval_SaveThread/RestoreThread, for `sparsify_parallel_for`
_PYTHON_API = [ctypes.cast(getattr(ctypes.pythonapi, f), ctypes.c_void_p).value
               for f in ("PyGILState_Ensure", "PyGILState_Release", "PyEval_SaveThread", "PyEval_RestoreThread")]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
why_unavailable: str | None = None  # set when the library could not be had, for diagnostics


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _cache_dir() -> Path:
    base = os.environ.get("SPARSIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    for d in (Path(base) / "kernels", Path(tempfile.gettempdir()) / f"sparsify-{os.getuid()}" / "kernels"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory for the compiled kernel")


def _build() -> ctypes.CDLL:
    if os.environ.get("SPARSIFY_NATIVE", "1") == "0":
        raise RuntimeError("turned off by SPARSIFY_NATIVE=0")
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError(f"built for x86-64 Linux only, not {sys.platform}/{platform.machine()}")
    if not {"avx512f", "fma"} <= _cpu_flags():
        raise RuntimeError("the CPU has no AVX-512")
    cxx = next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++"))), None)
    if cxx is None:
        raise RuntimeError("no C++ compiler on the PATH")
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([cxx, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"moe_gemm-{tag}.so"
    if not target.exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        done = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build by another process writes the same file
    lib = ctypes.CDLL(str(target))
    if lib.sparsify_moe_gemm_abi() != _ABI:
        raise RuntimeError("stale kernel library")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sparsify_moe_gemm.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int, ptr,
                                      ptr]
    lib.sparsify_moe_gemm.restype = None
    lib.sparsify_add_rows.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr]
    lib.sparsify_add_rows.restype = None
    lib.sparsify_parallel_for.argtypes = [i64, ctypes.c_int, _TASK, ptr, ptr, ptr, ptr]
    lib.sparsify_parallel_for.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried, why_unavailable
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as err:  # any failure means: run on oneDNN/MKL instead
                    why_unavailable = str(err)
                _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled GEMM can run here (builds it on the first call)."""
    return _library() is not None


# --- packed weights -------------------------------------------------------------------------

_MADV_HUGEPAGE = 14
_HUGE = 1 << 21
_madvise = None
if sys.platform == "linux":
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def _empty_huge(numel: int) -> Tensor:
    """A float32 buffer whose 2 MiB-aligned interior is asked to be backed by huge pages before it
    is first touched: the packed weights are streamed once per forward, and 4 KiB pages cost a TLB
    miss every 4 KiB of that stream."""
    if _madvise is None or numel * 4 < 4 * _HUGE:
        return torch.empty(numel)
    buf = torch.empty(numel + _HUGE // 4)
    start = buf.data_ptr()
    aligned = (start + _HUGE - 1) & ~(_HUGE - 1)
    end = (start + buf.numel() * 4) & ~(_HUGE - 1)
    _madvise(aligned, end - aligned, _MADV_HUGEPAGE)  # a refusal (THP off) only costs the huge pages
    offset = (aligned - start) // 4
    return buf[offset:offset + numel]


def _pack(w: Tensor) -> Tensor:
    """[E, N, K] -> [E, ceil(N / 64), K, 64]: panel p of expert e holds columns 64p.. of W[e]^T."""
    num, n, k = w.shape
    panels = -(-n // PANEL)
    out = _empty_huge(num * panels * k * PANEL).view(num, panels, k, PANEL)
    full = n // PANEL
    for e in range(num):  # an expert at a time: no temporary the size of all the weights
        src = w[e].detach().to(torch.float32)
        out[e, :full].copy_(src[: full * PANEL].view(full, PANEL, k).transpose(1, 2))
        if full < panels:
            tail = src.new_zeros((PANEL, k))
            tail[: n - full * PANEL] = src[full * PANEL:]
            out[e, full].copy_(tail.t())
    return out


def packed(w: Tensor) -> Tensor:
    """The packing of the stacked expert weights `w` [E, out, in] (cached until `w` changes;
    `gemm.clear_packed()` drops it)."""
    return cached_packing("native", w, lambda: _pack(w))


class Packed:
    """Addresses into a packing (see `packed`), for `gemm_at`."""

    def __init__(self, p: Tensor) -> None:
        self.tensor = p
        self.base, self.expert_stride, self.panel_stride = p.data_ptr(), p.stride(0), p.stride(1)

    def at(self, e: int, n0: int, k0: int) -> int:
        """Address of expert e's weight at output column n0 (a multiple of 64), input k0."""
        return self.base + 4 * (e * self.expert_stride + n0 // PANEL * self.panel_stride + k0 * PANEL)


def gemm_at(m: int, n: int, k: int, a: int, lda: int, a_rows: int | None, w: int, panel_stride: int, c: int, ldc: int,
            c_rows: int | None, bias: int | None = None, relu: bool = False, scale: int | None = None,
            next: int | None = None) -> None:
    """`sparsify_moe_gemm` (see moe_gemm.cpp) on addresses: the hot loops' form of `gemm`.
    Strides in floats; `a_rows`/`c_rows` address int64 row indices, `bias`/`scale` float32."""
    _lib.sparsify_moe_gemm(m, n, k, a, lda, a_rows, w, panel_stride, c, ldc, c_rows, bias, int(relu), scale, next)


def gemm(a: Tensor, a_rows: Tensor | None, p: Tensor, n0: int, n1: int, k0: int, k1: int, c: Tensor,
         c_rows: Tensor | None, bias: Tensor | None = None, relu: bool = False, scale: Tensor | None = None,
         next: Tensor | None = None) -> None:
    """Rows i < len(rows) of `c` (`c[c_rows[i]]`, else `c[i]`), columns 0..n1-n0, get
    `relu?((a_i @ W[n0:n1, k0:k1]^T + bias) * scale[i])` with `a_i` row `a[a_rows[i]]` (else
    `a[i]`) of `k1 - k0` values, for the weight W [N, K] of one expert packed as `p` [panels, K, 64]
    (n0 a multiple of 64). `next`: what will be multiplied next, prefetched at the end."""
    m = (a_rows if a_rows is not None else c_rows if c_rows is not None else c).shape[0]
    if m == 0 or n1 <= n0:
        return
    assert available() and n0 % PANEL == 0 and a.stride(-1) == 1 and c.stride(-1) == 1 and p.dim() == 3
    assert all(t is None or t.is_contiguous() for t in (a_rows, c_rows, bias, scale))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    gemm_at(m, n1 - n0, k1 - k0, a.data_ptr(), a.stride(0), ptr(a_rows), p[n0 // PANEL, k0].data_ptr(), p.stride(0),
            c.data_ptr(), c.stride(0), ptr(c_rows), ptr(bias), relu, ptr(scale), ptr(next))


def add_rows_at(m: int, n: int, src: int, lds: int, dst: int, ldd: int, rows: int | None) -> None:
    """`dst[rows[i]] += src[i]` on addresses (strides in floats)."""
    _lib.sparsify_add_rows(m, n, src, lds, dst, ldd, rows)


def add_rows(src: Tensor, dst: Tensor, rows: Tensor | None) -> None:
    """`dst[rows[i]] += src[i]` (`dst[i]` without `rows`), float32 rows of equal width."""
    assert available() and src.stride(-1) == 1 and dst.stride(-1) == 1
    add_rows_at(src.shape[0], src.shape[1], src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0),
                None if rows is None else rows.data_ptr())


def parallel_for(fn: Callable[[int], None], n: int, workers: int | None = None) -> None:
    """`fn(q)` for every q < n, handed out in order, one at a time, to `workers` (default
    `torch.get_num_threads()`) threads of torch's OpenMP team: the caller's thread and the ones
    torch's parallel ops run on. Those are still spinning after the caller's last op (libgomp
    spins some milliseconds before it sleeps), so they start at once, where a separate pool's
    threads would share the cores with them meanwhile. Torch ops inside `fn` run single-threaded;
    grad mode is off in `fn`, inference mode follows the caller's; the first exception raised by
    `fn` is re-raised here (items not started by then are skipped)."""
    lib = _library()
    assert lib is not None
    inference = torch.is_inference_mode_enabled()
    errors: list[BaseException] = []

    def task(q: int) -> None:
        if errors:
            return
        try:
            with torch.inference_mode(inference), torch.no_grad():
                fn(q)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    callback = _TASK(task)  # kept alive by this frame for the whole call
    lib.sparsify_parallel_for(n, torch.get_num_threads() if workers is None else workers, callback, *_PYTHON_API)
    if errors:
        raise errors[0]
