"""The GEMM engine of the CPU backend's forward: torch's default or oneDNN, whichever measures faster.

torch's `F.linear` runs float32 on MKL, which picks its code path by CPU vendor: on AMD it runs
AVX2 kernels even where AVX-512 is available. oneDNN (`mkldnn::_linear_pointwise`, the op
Inductor lowers linear layers to) picks by instruction set, and can fuse a relu into the GEMM.
Neither is faster everywhere, so the first forward in each dtype times both on an expert-sized
GEMM (64 rows) and keeps the faster for the process.

An expert GEMM has few rows, and oneDNN re-lays a plain weight matrix out into its blocked
format on every call: with 64 rows that copy costs about a sixth of the GEMM. Inference calls
(nothing needs a gradient) therefore use per-expert weights packed once into that format and
cached until the weight changes (in place, by an optimizer step or a load: its version counter
moves), at the cost of a second copy of the experts' weights in memory; `clear_packed()` drops
the cache. Both engines compute in the input precision: float32 stays float32, no TF32 or bf16.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["Linear", "ENGINES", "linear_engine", "packed_experts", "cached_packing", "clear_packed"]

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], torch.Tensor]


def _torch_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool) -> torch.Tensor:
    y = F.linear(x, w, b)
    return y.relu_() if relu else y


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool) -> torch.Tensor:
    # `w` is a plain [out, in] weight or one packed by `_pack`
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if relu else "none", [], "")


def _pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


ENGINES: dict[str, Linear] = {"torch": _torch_linear, "onednn": _onednn_linear}
_chosen: dict[torch.dtype, Linear] = {}
_lock = threading.Lock()


def _seconds(fn: Linear, x: torch.Tensor, w: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn(x, w, None, False)
        best = min(best, time.perf_counter() - start)
    return best


def _measure(dtype: torch.dtype) -> Linear:
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return _torch_linear  # oneDNN has no float64 linear, nor float16 without AVX512-FP16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g).to(dtype)
    w = torch.randn(2048, 512, generator=g).to(dtype)
    try:
        packed = _pack(w, x.shape[0])
        ours, theirs = _onednn_linear(x, packed, None, True), _torch_linear(x, w, None, True)
        agree = torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2)
    except RuntimeError:
        return _torch_linear
    if not agree:
        return _torch_linear
    _seconds(_torch_linear, x, w), _seconds(_onednn_linear, x, packed)  # warm both up
    return _onednn_linear if _seconds(_onednn_linear, x, packed) < _seconds(_torch_linear, x, w) else _torch_linear


def linear_engine(dtype: torch.dtype, weight: torch.Tensor) -> Linear:
    """`f(x, w, b, relu) -> relu?(x w^T + b)` on the faster engine for `dtype`."""
    if not weight.is_contiguous():
        return _torch_linear
    if dtype not in _chosen:
        with _lock:
            if dtype not in _chosen:
                with torch.inference_mode():
                    _chosen[dtype] = _measure(dtype)
    return _chosen[dtype]


# (packing kind, id(weight)) -> (weak reference to it, its identity when packed, the packing).
# Keyed by id because tensors compare elementwise; the entry goes when the weight is freed. Every
# packing of the cpu backend (oneDNN's here, the native GEMM's in `native`) lives here, so that
# `clear_packed` drops them all.
_packed: dict[tuple[str, int], tuple[weakref.ref, tuple, object]] = {}


def _identity(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot change in place either
        version = None
    return version, w.data_ptr(), w.dtype, tuple(w.shape)


def cached_packing(kind: str, w: torch.Tensor, build: Callable[[], object]) -> object:
    """`build()` (a packing of `w`), made once and cached until `w` changes or is freed."""
    key = (kind, id(w))
    with _lock:
        hit = _packed.get(key)
        if hit is not None and hit[0]() is w and hit[1] == _identity(w):
            return hit[2]
        with torch.inference_mode():
            packing = build()
        if hit is None or hit[0]() is not w:
            weakref.finalize(w, _packed.pop, key, None)
        _packed[key] = (weakref.ref(w), _identity(w), packing)
        return packing


def _forget_stepped(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    # Fused optimizers (torch.optim.AdamW(fused=True), transformers.Trainer's default) update the
    # parameters in place without bumping their version counters, so `_identity` cannot see the
    # change: drop the packings of every parameter an optimizer has just stepped.
    if not _packed:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with _lock:
        for key in [k for k in _packed if k[1] in stepped]:
            _packed.pop(key, None)


register_optimizer_step_post_hook(_forget_stepped)


def packed_experts(engine: Linear, w: torch.Tensor, rows: int) -> torch.Tensor | list[torch.Tensor]:
    """What `engine` should multiply expert e by: `result[e]`. For oneDNN, per-expert copies of the
    stacked weight `w` [E, out, in] packed for GEMMs of about `rows` rows (cached); else `w`."""
    if engine is not _onednn_linear:
        return w
    return cached_packing("onednn", w, lambda: [_pack(w[e].detach(), max(1, rows)) for e in range(w.shape[0])])


def clear_packed() -> None:
    """Drop every cached packed weight, of every engine (rebuilt on the next inference call)."""
    with _lock:
        _packed.clear()
