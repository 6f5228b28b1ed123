"""The CPU grouped FFN: expert segments spread over the cores (see `pool`), one core each.

Forward, per expert segment (rows grouped by expert):
    a = x W1^T + b1;  h = act(a) [* (x W3^T + b3)] [* dropout mask];  y = (h W2^T + b2) [* scale]
on the faster GEMM engine (see `gemm`; in inference on weights packed once for it), a relu fused
into the GEMM and other activations applied in place when nothing needs the pre-activation, and
the routing weight (`scale`) applied while the rows are in cache, as they are written into one
output buffer. In inference the dispatch gather (`rows`) runs in the workers too, and so does
the combine when no token has two rows: each weighted row goes straight to its token's row.
Float32 inference runs on the backend's own GEMM where it could be built (`native_ffn`, which
takes the same arguments); the rest (training, half precisions, no AVX-512) as described here.

The op and its backward are `torch.library` custom ops, so `torch.compile` treats them as one
opaque call (no graph break on the data-dependent expert loop), and autograd saves only what
the backward needs: the pre-activations `a`, the gate `u` and the unscaled output.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...activations import get_activation
from ..dropout import hidden_dropout_mask
from . import native_ffn
from .gemm import ENGINES, linear_engine, packed_experts
from .pool import parallel_map

__all__ = ["grouped_ffn", "gathered_ffn_inference"]

# Below this many multiply-adds (about a millisecond of one core) a call is too small for the
# worker threads and for oneDNN: their fixed costs per call (a thread handoff, some tens of
# microseconds per oneDNN GEMM) would outweigh the work, so it runs inline on torch's F.linear.
_SMALL_MACS = 1 << 26

_IN_PLACE = {"relu": torch.relu_, "silu": lambda t: F.silu(t, inplace=True), "sigmoid": torch.sigmoid_,
             "tanh": torch.tanh_, "mish": lambda t: F.mish(t, inplace=True)}


def _segments(counts: list[int], chunk: int | None = None) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty segment, cut into pieces of at most `chunk` rows,
    largest first (longest-processing-time-first keeps the cores finishing together)."""
    out, start = [], 0
    for e, n in enumerate(counts):
        pieces = max(1, -(-n // chunk)) if chunk else 1
        for i in range(pieces if n else 0):
            out.append((e, start + n * i // pieces, start + n * (i + 1) // pieces))
        start += n
    return sorted(out, key=lambda s: s[1] - s[2])


def _chunk(rows: int) -> int:
    # About 8 pieces per core balance the cores well; below 64 rows a GEMM gets inefficient.
    return max(64, -(-rows // (8 * torch.get_num_threads())))


def _small(rows: int, w1: Tensor) -> bool:
    return rows * w1.shape[1] * w1.shape[2] < _SMALL_MACS


def _at(t: Tensor | None, e: int) -> Tensor | None:
    return None if t is None else t[e]


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("sparsify::cpu_grouped_ffn", mutates_args=(), device_types="cpu")
def _forward(
    x: Tensor,
    rows: Optional[Tensor],
    counts: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor],
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    b3: Optional[Tensor],
    scale: Optional[Tensor],
    mask: Optional[Tensor],
    activation: str,
    save: bool,
    tokens: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, pre-activation, gate, unscaled y); the last three are empty unless `save`.

    Inference only (`save` False): with `rows`, segment rows are gathered from `x` [T, H] through
    `rows` inside the workers; with `tokens` >= 0 as well (rows naming each token at most once),
    each weighted row is written straight into row `rows[p]` of a [tokens, H] output, which is
    then the combined result.
    """
    act = get_activation(activation)
    act_ = _IN_PLACE.get(activation)
    n, inter, hidden = (x if rows is None else rows).shape[0], w1.shape[1], w2.shape[1]
    small = _small(n, w1)
    if not save and native_ffn.supports(x, w1, w2, w3, b1, b2, b3):  # float32 inference: see `native_ffn`
        y = native_ffn.native_forward(x, rows, _segments(counts.tolist(), _chunk(n)), w1, w2, w3, b1, b2, b3, scale,
                                      mask, activation, act_ or act, tokens, 1 if small else None)
        return y, _empty(x), _empty(x), _empty(x)
    linear = ENGINES["torch"] if small else linear_engine(x.dtype, w1)
    m1, m2, m3 = w1, w2, w3  # what expert e's rows are multiplied by: m1[e], ...
    if not save:  # inference: weights packed once for the engine (see `gemm`)
        hint = 1 << max(0, (n // w1.shape[0] - 1).bit_length())  # rows per expert, for the packing
        m1, m2 = packed_experts(linear, w1, hint), packed_experts(linear, w2, hint)
        m3 = None if w3 is None else packed_experts(linear, w3, hint)
    fuse_relu = activation == "relu" and not save  # the GEMM applies it; nothing needs the pre-activation
    scatter = tokens >= 0
    if scatter:  # rows missing from `rows` stay zero; when every token has its row, nothing to clear
        y = x.new_empty((tokens, hidden)) if n == tokens else x.new_zeros((tokens, hidden))
    else:
        y = x.new_empty((n, hidden))
    pre = x.new_empty((n, inter)) if save else _empty(x)
    gate = x.new_empty((n, inter)) if save and w3 is not None else _empty(x)
    unscaled = x.new_empty(y.shape) if save and scale is not None else _empty(x)
    scale = None if scale is None else scale.to(x.dtype).unsqueeze(-1)

    def run(seg: tuple[int, int, int]) -> None:
        e, s, t = seg
        xs = x[s:t] if rows is None else x.index_select(0, rows[s:t])
        h = linear(xs, m1[e], _at(b1, e), fuse_relu)
        if save:
            pre[s:t] = h
            h = act(h)
        elif not fuse_relu:
            h = act_(h) if act_ is not None else act(h)
        if w3 is not None:
            u = linear(xs, m3[e], _at(b3, e), False)
            if save:
                gate[s:t] = u
            h.mul_(u)
        if mask is not None:
            h.mul_(mask[s:t])
        out = linear(h, m2[e], _at(b2, e), False)
        if unscaled.numel():
            unscaled[s:t] = out
        if scatter:  # distinct rows: the workers never write the same output row
            y.index_copy_(0, rows[s:t], out if scale is None else out.mul_(scale[s:t]))
        elif scale is not None:
            torch.mul(out, scale[s:t], out=y[s:t])
        else:
            y[s:t] = out

    parallel_map(run, _segments(counts.tolist(), _chunk(n)), 1 if small else None)
    return y, pre, gate, unscaled


@_forward.register_fake
def _(x, rows, counts, w1, w2, w3, b1, b2, b3, scale, mask, activation, save, tokens):
    n, inter = (x.shape[0] if rows is None else rows.shape[0]), w1.shape[1]
    y = x.new_empty((tokens if tokens >= 0 else n, w2.shape[1]))
    pre = x.new_empty((n, inter)) if save else _empty(x)
    gate = x.new_empty((n, inter)) if save and w3 is not None else _empty(x)
    unscaled = x.new_empty(y.shape) if save and scale is not None else _empty(x)
    return y, pre, gate, unscaled


@torch.library.custom_op("sparsify::cpu_grouped_ffn_backward", mutates_args=(), device_types="cpu")
def _backward(
    grad: Tensor,
    x: Tensor,
    counts: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Optional[Tensor],
    scale: Optional[Tensor],
    mask: Optional[Tensor],
    pre: Tensor,
    gate: Tensor,
    unscaled: Tensor,
    activation: str,
    biases: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, w1, w2, w3, b1, b2, b3, scale); absent inputs get empty tensors."""
    act = get_activation(activation)
    num_experts = w1.shape[0]
    dx = torch.empty_like(x)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    dw3 = torch.empty_like(w3) if w3 is not None else _empty(x)
    db1 = w1.new_zeros(w1.shape[:2]) if biases[0] else _empty(x)
    db2 = w2.new_zeros(w2.shape[:2]) if biases[1] else _empty(x)
    db3 = w1.new_zeros(w1.shape[:2]) if biases[2] else _empty(x)
    dscale = torch.empty_like(scale) if scale is not None else _empty(x)
    sizes = counts.tolist()
    for e in range(num_experts):  # experts that got no rows get zero gradients
        if sizes[e] == 0:
            for w in (dw1, dw2, dw3):
                if w.numel():
                    w[e].zero_()

    def run(seg: tuple[int, int, int]) -> None:
        e, s, t = seg
        xs, dy = x[s:t], grad[s:t]
        if scale is not None:
            dscale[s:t] = (dy * unscaled[s:t]).sum(-1)
            dy = dy * scale[s:t].to(dy.dtype).unsqueeze(-1)
        with torch.enable_grad():  # the activation's derivative, whichever activation it is
            a = pre[s:t].detach().requires_grad_()
            f = act(a)
        h = f.detach()
        if w3 is not None:
            h = h * gate[s:t]
        if mask is not None:
            h = h * mask[s:t]
        torch.mm(dy.t(), h, out=dw2[e])
        if biases[1]:
            db2[e] = dy.sum(0)
        dh = dy @ w2[e]
        if mask is not None:
            dh.mul_(mask[s:t])
        du = None
        if w3 is not None:
            du = dh * f.detach()
            dh.mul_(gate[s:t])
        (da,) = torch.autograd.grad(f, a, dh)
        torch.mm(da.t(), xs, out=dw1[e])
        torch.mm(da, w1[e], out=dx[s:t])
        if biases[0]:
            db1[e] = da.sum(0)
        if du is not None:
            torch.mm(du.t(), xs, out=dw3[e])
            dx[s:t].addmm_(du, w3[e])
            if biases[2]:
                db3[e] = du.sum(0)

    parallel_map(run, _segments(sizes), 1 if _small(x.shape[0], w1) else None)
    return dx, dw1, dw2, dw3, db1, db2, db3, dscale


@_backward.register_fake
def _(grad, x, counts, w1, w2, w3, scale, mask, pre, gate, unscaled, activation, biases):
    return (
        torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2),
        torch.empty_like(w3) if w3 is not None else _empty(x),
        w1.new_empty(w1.shape[:2]) if biases[0] else _empty(x),
        w2.new_empty(w2.shape[:2]) if biases[1] else _empty(x),
        w1.new_empty(w1.shape[:2]) if biases[2] else _empty(x),
        torch.empty_like(scale) if scale is not None else _empty(x),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, rows, counts, w1, w2, w3, b1, b2, b3, scale, mask, activation, save, tokens = inputs
    _, pre, gate, unscaled = output
    ctx.save_for_backward(x, counts, w1, w2, w3, scale, mask, pre, gate, unscaled)
    ctx.activation = activation
    ctx.biases = [b1 is not None, b2 is not None, b3 is not None]


def _autograd_backward(ctx, grad, *_saved_grads):
    x, counts, w1, w2, w3, scale, mask, pre, gate, unscaled = ctx.saved_tensors
    if not pre.numel() and x.shape[0]:
        raise RuntimeError("cpu grouped_ffn ran without saving activations; call it with grad enabled")
    dx, dw1, dw2, dw3, db1, db2, db3, dscale = _backward(
        grad.contiguous(), x, counts, w1, w2, w3, scale, mask, pre, gate, unscaled, ctx.activation, ctx.biases
    )
    some = lambda t, present: t if present else None  # noqa: E731
    return (
        dx, None, None, dw1, dw2, some(dw3, w3 is not None), some(db1, ctx.biases[0]), some(db2, ctx.biases[1]),
        some(db3, ctx.biases[2]), some(dscale, scale is not None), None, None, None, None,
    )


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def grouped_ffn(
    x: Tensor,
    counts: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    b3: Tensor | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    training: bool = False,
    scale: Tensor | None = None,
) -> Tensor:
    """Rows of `x` grouped by expert through each expert's FFN; the reference's contract, plus
    `scale` [N]: a per-row factor applied to the output (the routing weight, fused here)."""
    params = [t for t in (x, w1, w2, w3, b1, b2, b3, scale) if t is not None]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    mask = hidden_dropout_mask(x.shape[0], w1.shape[1], dropout, x) if dropout > 0.0 and training else None
    y, *_ = _forward(
        x.contiguous(), None, counts.cpu(), w1, w2, w3, b1, b2, b3,
        None if scale is None else scale.contiguous(), mask, activation, save, -1,
    )
    return y


def gathered_ffn_inference(
    x: Tensor, rows: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, b1: Tensor | None,
    b2: Tensor | None, b3: Tensor | None, activation: str, scale: Tensor, tokens: int,
) -> Tensor:
    """Inference: expert FFNs of rows `x[rows]` (grouped by expert) weighted by `scale`, gathered in
    the workers; with `tokens` >= 0, written to those token rows of a [tokens, H] output (rows
    must then name each token at most once), else returned row for row like `grouped_ffn`."""
    y, *_ = _forward(x.contiguous(), rows, counts.cpu(), w1, w2, w3, b1, b2, b3, scale.contiguous(), None,
                     activation, False, tokens)
    return y
