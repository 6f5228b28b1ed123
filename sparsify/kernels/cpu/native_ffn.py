"""The CPU grouped FFN's float32 inference forward on the native GEMM (see `native`).

Work items are the segments cut into pieces as `grouped_ffn` cuts them (largest first); the last
2 x threads pieces are cut again, in two halves of the ffn dimension, so the last items are small
and the cores finish together without either reading any weight twice: a half needs only its
rows of W1 (and W3) and its columns of W2. The item for columns f0:f1 computes

    h = act(x W1[f0:f1]^T + b1[f0:f1]) [* (x W3[f0:f1]^T + b3[f0:f1])] [* dropout mask]
    part = (h W2[:, f0:f1]^T [+ b2, first half only]) * scale

with x's rows gathered through `rows` inside the GEMM, relu fused into it. The first half
writes its part where the output goes (with `tokens` >= 0, straight into the tokens' rows: the
top-1 combine), the other into a buffer, and whichever finishes last adds the buffer in. Items
run on torch's OpenMP threads (`native.parallel_for`)."""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import Tensor

from . import native

__all__ = ["native_forward", "supports"]


def supports(x: Tensor, *weights: Tensor | None) -> bool:
    """Whether `native_forward` can run these tensors: float32 throughout, and the library built."""
    return all(t is None or t.dtype == torch.float32 for t in (x, *weights)) and native.available()


def _cuts(inter: int, parts: int) -> list[int]:
    """Cut points of the ffn dimension into `parts` pieces on panel boundaries."""
    panels = -(-inter // native.PANEL)
    parts = max(1, min(parts, panels))
    return [min(inter, panels * i // parts * native.PANEL) for i in range(parts)] + [inter]


def _items(pieces: int, inter: int, threads: int) -> list[tuple[int, int, int]]:
    """(piece, f0, f1) work items: whole pieces, but the last 2 x threads of them (the smallest, as
    pieces come largest first) cut in two along the ffn dimension, so that the cores finish together."""
    halves = _cuts(inter, 2 if threads > 1 else 1)
    items = []
    for i in range(pieces):
        if i >= pieces - 2 * threads and len(halves) > 2:
            items += [(i, halves[0], halves[1]), (i, halves[1], halves[2])]
        else:
            items.append((i, 0, inter))
    return items


def native_forward(
    x: Tensor, rows: Tensor | None, segments: list[tuple[int, int, int]], w1: Tensor, w2: Tensor, w3: Tensor | None,
    b1: Tensor | None, b2: Tensor | None, b3: Tensor | None, scale: Tensor | None, mask: Tensor | None,
    activation: str, activate: Callable[[Tensor], Tensor], tokens: int, workers: int | None,
) -> Tensor:
    """The grouped FFN of `_forward` in inference (its contract), over the given segments;
    `activate` applies `activation` (in place where it can) and returns the result."""
    x = x.contiguous()
    n = x.shape[0] if rows is None else rows.shape[0]
    inter, hidden = w1.shape[1], w2.shape[1]
    # the kernel reads and writes through raw pointers: out-of-range rows must not reach it
    if any(t > n for _, _, t in segments):
        raise ValueError(f"expert segments cover {max(t for _, _, t in segments)} rows, the input has {n}")
    if rows is not None and n:
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= x.shape[0] or 0 <= tokens <= hi:
            raise IndexError(f"row index {lo if lo < 0 else hi} out of range for {x.shape[0]} input rows"
                             + (f" and {tokens} output rows" if tokens >= 0 else ""))
    p1, p2 = native.Packed(native.packed(w1)), native.Packed(native.packed(w2))
    p3 = None if w3 is None else native.Packed(native.packed(w3))
    scatter = tokens >= 0
    if scatter:  # rows missing from `rows` stay zero; when every token has its row, nothing to clear
        y = x.new_empty((tokens, hidden)) if n == tokens else x.new_zeros((tokens, hidden))
    else:
        y = x.new_empty((n, hidden))
    # addresses for the kernel, kept alive by these names until the end of the call
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    b1, b2, b3 = (None if b is None else b.to(torch.float32).contiguous() for b in (b1, b2, b3))
    width_in, x_at, y_at = x.shape[1], x.data_ptr(), y.data_ptr()
    rows_at = None if rows is None else rows.data_ptr()
    scale_at = None if scale is None else scale.data_ptr()

    def vector(b: Tensor | None, e: int, f0: int) -> int | None:  # address of b[e, f0]
        return None if b is None else b.data_ptr() + 4 * (e * b.shape[1] + f0)

    fuse_relu = activation == "relu"
    threads = torch.get_num_threads() if workers is None else workers
    items = _items(len(segments), inter, threads)
    left = [0] * len(segments)  # parts of each piece not finished yet
    for i, _, _ in items:
        left[i] += 1
    spare: list[list[Tensor]] = [[] for _ in segments]  # finished parts other than the first
    lock = threading.Lock()

    def run(q: int) -> None:
        i, f0, f1 = items[q]
        e, s, t = segments[i]
        m, width = t - s, f1 - f0
        # rows of x: gathered through rows[s:t], or x[s:t]
        a, a_rows = (x_at, rows_at + 8 * s) if rows is not None else (x_at + 4 * s * width_in, None)
        h = x.new_empty((m, width))
        native.gemm_at(m, width, width_in, a, width_in, a_rows, p1.at(e, f0, 0), p1.panel_stride, h.data_ptr(), width,
                       None, vector(b1, e, f0), fuse_relu, None, (p2 if p3 is None else p3).at(e, 0, 0))
        if not fuse_relu:
            h = activate(h)
        if p3 is not None:
            u = x.new_empty(h.shape)
            native.gemm_at(m, width, width_in, a, width_in, a_rows, p3.at(e, f0, 0), p3.panel_stride, u.data_ptr(),
                           width, None, vector(b3, e, f0), False, None, p2.at(e, 0, 0))
            h.mul_(u)
        if mask is not None:
            h.mul_(mask[s:t, f0:f1])
        # the output rows: the tokens' rows of y, or y[s:t]
        out, out_rows = (y_at, rows_at + 8 * s) if scatter else (y_at + 4 * s * hidden, None)
        first = f0 == 0
        buf = None if first else x.new_empty((m, hidden))
        # prefetched at the end: what this core probably runs next (the other core takes q + 1)
        ahead = items[q + threads] if q + threads < len(items) else None
        native.gemm_at(m, hidden, width, h.data_ptr(), width, None, p2.at(e, 0, f0), p2.panel_stride,
                       out if first else buf.data_ptr(), hidden, out_rows if first else None,
                       vector(b2, e, 0) if first else None, False, None if scale is None else scale_at + 4 * s,
                       None if ahead is None else p1.at(segments[ahead[0]][0], ahead[1], 0))
        with lock:  # the lock also orders the other parts' writes before the last one's reads
            if buf is not None:
                spare[i].append(buf)
            left[i] -= 1
            last = left[i] == 0
        if last:
            for part in spare[i]:
                native.add_rows_at(m, hidden, part.data_ptr(), hidden, out, hidden, out_rows)

    native.parallel_for(run, len(items), workers)
    return y
