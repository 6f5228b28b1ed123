"""Launching the Triton kernels: the MoE FFN forward and backward as custom ops with autograd.

Forward (two launches; three where the tuner prefers to gather the rows by a copy first and
read them through a TMA descriptor): `up_kernel` gathers each pair's token row and computes
h = act(x W1^T + b1) [* (x W3^T + b3)] per expert; `down_kernel` computes h W2^T + b2, weights
each row by its routing weight and adds it atomically into its token's float32 output row.

Backward (five launches, no host synchronisation): dh through `up_kernel` in backward mode
(activation and gate derivatives fused), dx through `down_kernel` (both branches of a gated FFN
in one accumulator, scattered back to tokens), dW1, dW2, dW3 through `wgrad_kernel`; the few
row reductions (bias gradients, routing-weight gradient) are torch ops.

Being custom ops, both are single opaque calls to `torch.compile`; eager inference calls the
forward's implementation directly (the custom op's dispatch costs the host more than the kernels
take at decode sizes).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..dropout import hidden_dropout_mask
from ..reference import offsets_of, sorted_offsets
from .activations import ACT_CODES
from .kernels import down_kernel, up_kernel, wgrad_kernel
from .tuning import interpreting, pick, rows_bucket

__all__ = ["moe_ffn", "grouped_ffn"]


# Row blocks per group of the programs' launch order (see `kernels._tile`): with ~130 programs in
# flight, 16 row blocks x ~8 column blocks balance re-reads of the rows against re-reads of weights.
# The interpreter's test shapes have a handful of blocks: groups of 2 make them span several groups.
GROUP_M = 2 if interpreting() else 16


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own matmul setting: full precision unless TF32 is allowed
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _flags(dtype: torch.dtype) -> dict:
    return {"DOT_F32": interpreting() and dtype == torch.bfloat16, "PRECISION": _precision(dtype)}


def _desc_ok(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can read these tensors: last dimension contiguous, the other
    strides and the base address 16-byte aligned (the hardware's rule)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _operand(t: Tensor, desc: bool, block: list[int]):
    """`t` for a kernel: the tensor itself, or with `desc` a TMA descriptor of `block` tiles (weights
    [E, N, K] read in [1, BN, BK] tiles or [E, K, N] in [1, BK, BN]; row-major activations [rows, K]
    in [BM, BK])."""
    if not desc:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _cdiv(a: int, b: int) -> int:
    # Plain integers: triton.cdiv and triton.next_power_of_2 are constexpr functions, 1.5 us a
    # call, six per eager layer: 9 us of this module's host time (about 44 us per layer here).
    return -(-a // b)


def _e_pad(experts: int) -> int:
    return 1 << (max(2, experts) - 1).bit_length()


def _grid_rows(rows: int, experts: int, bm: int) -> int:
    """Row blocks to launch: an upper bound on the experts' blocks, known without the counts."""
    return _cdiv(rows, bm) + experts


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    # Under the interpreter: a few programs, so that each loops over several of the tests' tiles.
    return 3 if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _shared_limit(device: torch.device) -> Optional[int]:
    """Shared memory one program may use on `device`, bytes (None under the interpreter)."""
    if interpreting():
        return None
    # None (no estimate) where this torch does not report it
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


class _Room:
    """Whether a configuration's pipeline can fit the device's shared memory, estimated as `stages`
    buffers of its [BM, BK] row tiles (`a_tiles` operands) and [BK, BN] weight tiles (`b_tiles`),
    so that the tuner does not compile tiles only to see them fail at launch. The compiler's own
    figure differs by a stage of rows either way; CI compiles every candidate for an H100 and
    checks that none this rules out would have fitted (tests/kernels/test_triton_sm90.py)."""

    def __init__(self, device: torch.device, a_tiles: int, b_tiles: int, element_size: int) -> None:
        # built on every launch; the device is asked for its limit only while tuning
        self.device, self.a_tiles, self.b_tiles, self.size = device, a_tiles, b_tiles, element_size

    def bytes(self, cfg) -> int:
        return cfg.stages * (self.a_tiles * cfg.bm * cfg.bk + self.b_tiles * cfg.bk * cfg.bn) * self.size

    def __call__(self, cfg) -> bool:
        limit = _shared_limit(self.device)
        return limit is None or self.bytes(cfg) <= limit


def _programs(tiles: int, persist: int, device: torch.device) -> int:
    """Programs to launch for `tiles` output tiles (an upper bound): one per tile, or with
    persistent programs one per multiprocessor (fewer where there are fewer tiles); the kernels
    get the count as PROGRAMS, their loop's step (0 when not persistent: one compiled variant)."""
    return min(tiles, _multiprocessors(device)) if persist else tiles


def _launch_up(a, a_idx, a_scale, b1, b3, bias1, bias3, mask, pre, gate, out1, out3, offsets,
               strides, act, backward, save, gated) -> None:
    rows, n, k, experts = out1.shape[0], out1.shape[1], a.shape[1], offsets.numel() - 1
    bucket = rows_bucket(rows, experts)

    b_nk = strides[1] == 1  # the weight is stored [E, N, K] (else [E, K, N], N contiguous)
    desc_ok = _desc_ok(*(t for t in (b1, b3) if t is not None))
    # rows in expert order (gathered by a copy where the kernel would gather them) are [rows, K] contiguous
    rows_desc_ok = (k * a.element_size()) % 16 == 0 and (a_idx is not None or _desc_ok(a))

    def run(cfg, o1=out1, o3=out3, p=pre, g=gate) -> None:
        m_blocks = _grid_rows(rows, experts, cfg.bm)
        tiles = m_blocks * _cdiv(n, cfg.bn)
        block = [1, cfg.bn, cfg.bk] if b_nk else [1, cfg.bk, cfg.bn]
        w1 = _operand(b1, cfg.desc, block)
        src, idx = a, a_idx
        if cfg.rows_desc and idx is not None:
            src, idx = a.index_select(0, idx), None
        programs = _programs(tiles, cfg.persist, a.device)
        up_kernel[(programs,)](
            _operand(src, cfg.rows_desc, [cfg.bm, cfg.bk]), a if idx is None else idx,
            a if a_scale is None else a_scale,
            w1, w1 if b3 is None else _operand(b3, cfg.desc, block),
            a if bias1 is None else bias1, a if bias3 is None else bias3, a if mask is None else mask, p, g, o1, o3,
            offsets, experts, m_blocks, programs if cfg.persist else 0, n, k, src.stride(0), *strides,
            ACT=ACT_CODES[act], GATED=gated, DUAL=gated and not backward, GATHER=idx is not None,
            SCALE=a_scale is not None, HAS_BIAS1=bias1 is not None, HAS_BIAS3=bias3 is not None,
            HAS_MASK=mask is not None, SAVE=save, BACKWARD=backward, DESC=bool(cfg.desc),
            A_DESC=bool(cfg.rows_desc), B_NK=b_nk, PERSIST=cfg.persist, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
            GROUP_M=GROUP_M, E_PAD=_e_pad(experts), num_warps=cfg.warps, num_stages=cfg.stages, **_flags(a.dtype),
        )

    def scratch(cfg) -> None:
        run(cfg, torch.empty_like(out1), torch.empty_like(out3), torch.empty_like(pre) if save else pre,
            torch.empty_like(gate) if save else gate)

    key = ("bwd" if backward else "fwd", a.dtype, n, k, experts, gated)
    room = _Room(a.device, 1, 2 if gated and not backward else 1, b1.element_size())
    run(pick("up", key, bucket, scratch, desc_ok=desc_ok, rows_desc_ok=rows_desc_ok, room=room))


def _launch_down(a, a2, b, b2, bias, row_tok, row_scale, out, y, offsets, strides, scatter) -> None:
    rows, n, k, experts = a.shape[0], out.shape[1], a.shape[1], offsets.numel() - 1
    bucket = rows_bucket(rows, experts)
    # Split-K adds partial sums atomically: only where the output is an atomic float32 sum.
    split_ok = y is None and scatter

    b_nk = strides[1] == 1
    desc_ok = _desc_ok(*(t for t in (a, a2, b, b2) if t is not None))

    def run(cfg, o=out, yy=y) -> None:
        m_blocks = _grid_rows(rows, experts, cfg.bm)
        tiles = m_blocks * _cdiv(n, cfg.bn)
        block = [1, cfg.bn, cfg.bk] if b_nk else [1, cfg.bk, cfg.bn]
        ad, bd = _operand(a, cfg.desc, [cfg.bm, cfg.bk]), _operand(b, cfg.desc, block)
        programs = _programs(tiles, cfg.persist, a.device)
        down_kernel[(programs, cfg.split)](
            ad, ad if a2 is None else _operand(a2, cfg.desc, [cfg.bm, cfg.bk]), bd,
            bd if b2 is None else _operand(b2, cfg.desc, block),
            a if bias is None else bias, row_tok, a if row_scale is None else row_scale, o, a if yy is None else yy,
            offsets, experts, m_blocks, programs if cfg.persist else 0, n, k, *strides,
            DUAL=a2 is not None, HAS_BIAS=bias is not None, SCALE=row_scale is not None, SCATTER=scatter,
            SAVE_Y=yy is not None, SPLIT_K=cfg.split, DESC=bool(cfg.desc), B_NK=b_nk, PERSIST=cfg.persist,
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=GROUP_M, E_PAD=_e_pad(experts), num_warps=cfg.warps,
            num_stages=cfg.stages, **_flags(a.dtype),
        )

    def scratch(cfg) -> None:
        run(cfg, torch.zeros_like(out), None if y is None else torch.empty_like(y))

    key = (a.dtype, n, k, experts, a2 is not None, scatter)
    operands = 1 if a2 is None else 2
    room = _Room(a.device, operands, operands, b.element_size())
    run(pick("down", key, bucket, scratch, split_ok=split_ok, desc_ok=desc_ok, room=room))


def _launch_wgrad(a, a_idx, a_scale, b, b_idx, out, offsets) -> None:
    m, n = out.shape[1], out.shape[2]

    def run(cfg, o=out) -> None:
        wgrad_kernel[(out.shape[0], _cdiv(m, cfg.bm) * _cdiv(n, cfg.bn))](
            a, a if a_idx is None else a_idx, a if a_scale is None else a_scale, b, b if b_idx is None else b_idx,
            o, offsets, m, n, a.stride(0), b.stride(0),
            GATHER_A=a_idx is not None, SCALE_A=a_scale is not None, GATHER_B=b_idx is not None,
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, num_warps=cfg.warps, num_stages=cfg.stages, **_flags(a.dtype),
        )

    rows = a.shape[0] if a_idx is None else a_idx.shape[0]
    key = (a.dtype, m, n, out.shape[0])
    run(pick("wgrad", key, rows_bucket(rows, out.shape[0]), lambda cfg: run(cfg, torch.empty_like(out)),
             room=_Room(a.device, 1, 1, a.element_size())))


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _forward_impl(
    x: Tensor, tok: Tensor, scale: Optional[Tensor], offsets: Tensor,
    w1: Tensor, w2: Tensor, w3: Optional[Tensor], b1: Optional[Tensor], b2: Optional[Tensor], b3: Optional[Tensor],
    mask: Optional[Tensor], activation: str, scatter: bool, save: bool, save_y: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, h, pre-activation, gate, unweighted y); the last three are empty unless saved."""
    rows, inter, hidden = tok.numel(), w1.shape[1], w2.shape[1]
    h = x.new_empty((rows, inter))
    pre = x.new_empty((rows, inter)) if save else _empty(x)
    gate = x.new_empty((rows, inter)) if save and w3 is not None else _empty(x)
    y = x.new_empty((rows, hidden)) if save_y else None
    out = x.new_zeros((x.shape[0], hidden), dtype=torch.float32) if scatter else x.new_empty((rows, hidden))
    if rows:
        _launch_up(x, tok, None, w1, w3, b1, b3, mask, pre, gate, h, h, offsets,
                   (w1.stride(0), w1.stride(2), w1.stride(1)), activation, backward=False, save=save,
                   gated=w3 is not None)
        _launch_down(h, None, w2, None, b2, tok, scale, out, y, offsets,
                     (w2.stride(0), w2.stride(2), w2.stride(1)), scatter)
    return out.to(x.dtype), h, pre, gate, _empty(x) if y is None else y


_forward = torch.library.custom_op("sparsify::triton_moe_ffn", _forward_impl, mutates_args=(),
                                   device_types=("cuda", "cpu"))


@_forward.register_fake
def _(x, tok, scale, offsets, w1, w2, w3, b1, b2, b3, mask, activation, scatter, save, save_y):
    rows, inter, hidden = tok.numel(), w1.shape[1], w2.shape[1]
    return (
        x.new_empty((x.shape[0] if scatter else rows, hidden)), x.new_empty((rows, inter)),
        x.new_empty((rows, inter)) if save else _empty(x),
        x.new_empty((rows, inter)) if save and w3 is not None else _empty(x),
        x.new_empty((rows, hidden)) if save_y else _empty(x),
    )


@torch.library.custom_op("sparsify::triton_moe_ffn_backward", mutates_args=(), device_types=("cuda", "cpu"))
def _backward(
    grad: Tensor, x: Tensor, tok: Tensor, scale: Optional[Tensor], offsets: Tensor,
    w1: Tensor, w2: Tensor, w3: Optional[Tensor], mask: Optional[Tensor],
    h: Tensor, pre: Tensor, gate: Tensor, y: Tensor, activation: str, biases: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, w1, w2, w3, b1, b2, b3, scale); absent ones are empty."""
    rows, num_experts = tok.numel(), offsets.numel() - 1
    dpre = torch.empty_like(pre)
    dgate = torch.empty_like(gate) if w3 is not None else None
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    dw3 = torch.empty_like(w3) if w3 is not None else _empty(x)
    if rows:
        _launch_up(grad, tok, scale, w2, None, None, None, mask, pre, gate, dpre,
                   dpre if dgate is None else dgate, offsets, (w2.stride(0), w2.stride(1), w2.stride(2)),
                   activation, backward=True, save=False, gated=w3 is not None)
        _launch_down(dpre, dgate, w1, w3, None, tok, None, dx, None, offsets,
                     (w1.stride(0), w1.stride(1), w1.stride(2)), scatter=True)
    _launch_wgrad(grad, tok, scale, h, None, dw2, offsets)
    _launch_wgrad(dpre, None, None, x, tok, dw1, offsets)
    if dgate is not None:
        _launch_wgrad(dgate, None, None, x, tok, dw3, offsets)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), offsets.diff(),
                                            output_size=rows)

    def segment_sum(t: Tensor, present: bool) -> Tensor:
        if not present:
            return _empty(x)
        sums = t.new_zeros((num_experts, t.shape[1]), dtype=torch.float32)
        return sums.index_add_(0, expert_of_row, t.float()).to(t.dtype)

    gy = grad.index_select(0, tok)
    if scale is not None:
        gy_scaled = gy * scale.to(gy.dtype).unsqueeze(-1)
    else:
        gy_scaled = gy
    dscale = (gy * y).sum(-1).to(scale.dtype) if scale is not None and y.numel() else _empty(x)
    return (
        dx.to(x.dtype), dw1, dw2, dw3, segment_sum(dpre, biases[0]), segment_sum(gy_scaled, biases[1]),
        segment_sum(dpre if dgate is None else dgate, biases[2] and dgate is not None), dscale,
    )


@_backward.register_fake
def _(grad, x, tok, scale, offsets, w1, w2, w3, mask, h, pre, gate, y, activation, biases):
    e, i, hid = w1.shape
    return (
        torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2),
        torch.empty_like(w3) if w3 is not None else _empty(x),
        x.new_empty((e, i)) if biases[0] else _empty(x), x.new_empty((e, hid)) if biases[1] else _empty(x),
        x.new_empty((e, i)) if biases[2] and w3 is not None else _empty(x),
        scale.new_empty(scale.shape) if scale is not None and y.numel() else _empty(x),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, tok, scale, offsets, w1, w2, w3, b1, b2, b3, mask, activation, scatter, save, save_y = inputs
    _, h, pre, gate, y = output
    ctx.save_for_backward(x, tok, scale, offsets, w1, w2, w3, mask, h, pre, gate, y)
    ctx.activation = activation
    ctx.biases = [b1 is not None, b2 is not None, b3 is not None]


def _autograd_backward(ctx, grad, *_saved_grads):
    x, tok, scale, offsets, w1, w2, w3, mask, h, pre, gate, y = ctx.saved_tensors
    if not pre.numel() and tok.numel():
        raise RuntimeError("triton moe_ffn ran without saving activations; call it with grad enabled")
    dx, dw1, dw2, dw3, db1, db2, db3, dscale = _backward(
        grad.contiguous(), x, tok, scale, offsets, w1, w2, w3, mask, h, pre, gate, y, ctx.activation, ctx.biases
    )
    b1, b2, b3 = ctx.biases
    return (
        dx, None, dscale if dscale.numel() else None, None, dw1, dw2, dw3 if w3 is not None else None,
        db1 if b1 else None, db2 if b2 else None, db3 if b3 and w3 is not None else None,
        None, None, None, None, None,
    )


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _run(x, tok, scale, offsets, w1, w2, w3, b1, b2, b3, activation, dropout, training, scatter) -> Tensor:
    tensors = [t for t in (x, scale, w1, w2, w3, b1, b2, b3) if t is not None]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    save_y = save and scale is not None and scale.requires_grad
    mask = hidden_dropout_mask(tok.numel(), w1.shape[1], dropout, x) if dropout > 0.0 and training else None
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    # Inference in eager mode calls the kernels directly: the custom op is what autograd and
    # torch.compile need, and its dispatch costs the host more than the kernels take at decode sizes.
    forward = _forward if save or torch.compiler.is_compiling() else _forward_impl
    out, *_ = forward(
        x.contiguous(), tok, contiguous(scale), offsets, w1, w2, w3, contiguous(b1), contiguous(b2), contiguous(b3),
        mask, activation, scatter, save, save_y,
    )
    return out


def moe_ffn(x: Tensor, token_idx: Tensor, expert_idx: Tensor, weight: Tensor, experts: torch.nn.Module) -> Tensor:
    """The fused MoE FFN of `x` [T, H] for (token, expert, weight) pairs (see module docstring)."""
    order, offsets = sorted_offsets(expert_idx, experts.num_experts)
    return _run(x, token_idx[order], weight[order], offsets, experts.w1, experts.w2, experts.w3, experts.b1,
                experts.b2, experts.b3, experts.activation, experts.dropout, experts.training, scatter=True)


def grouped_ffn(x, counts, w1, w2, w3=None, b1=None, b2=None, b3=None, activation="relu", dropout=0.0,
                training=False) -> Tensor:
    """Each expert's FFN on its segment of the grouped rows `x` (the kernels without the gather
    and the combine: rows are their own tokens)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return _run(x, rows, None, offsets_of(counts.to(x.device)), w1, w2, w3, b1, b2, b3, activation, dropout,
                training, scatter=False)
