"""The three Triton kernels of the MoE FFN, forward and backward.

Rows are (token, expert) pairs sorted by expert; expert e owns sorted rows
`OFFSETS[e]:OFFSETS[e + 1]`. The row blocks of the first two kernels never straddle two experts:
each program finds its expert and rows from the offsets (`_tile`); the grid is launched for an
upper bound on the block count, ceil(rows / BM) + E, and programs past the last block return at
once, so the host never waits for the routing to know it. Weights are [E, ., .] with arbitrary
strides, which lets one kernel read W or W^T. Accumulation is float32.

With DESC, weights (and the second kernel's sorted rows) are read through TMA tensor descriptors
(Hopper and newer; the host passes descriptors instead of pointers): a tile of rows read past an
expert's segment belongs to the next expert and is masked at the store; past the tensor's end it
reads zeros, as the masked pointer loads do. With A_DESC the first kernel's rows come through a
descriptor too (rows that are already in expert order, e.g. gathered by a copy beforehand).

With PERSIST, one program per multiprocessor loops over the tiles that hold rows (their count
read from the offsets on the device) instead of one program per tile; each tile's work is the
same function (`_up_tile`, `_down_tile`).

- `up_kernel`: rows gathered from A through A_IDX (the token index: the gather of dispatch is
  fused into the loads), optionally scaled per row, times B1[e] (and B3[e] for the gate).
  Forward epilogue: bias, activation, gate, dropout mask, store h (and the pre-activations when
  autograd needs them). Backward epilogue: the activation's and the gate's derivatives (GATED
  then means "the FFN is gated"; DUAL, the second product, is only for the forward).
- `down_kernel`: sorted rows times B[e] (plus A2 times B2[e]), bias, per-row routing weight,
  then either a store or an atomic add into row ROW_TOK[r] of a float32 output: the weighted
  scatter-combine fused into the GEMM. Split-K over the reduction, partial sums added atomically.
- `wgrad_kernel`: per expert, sum over its rows of (left row)^T (right row): weight gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activations import act_derivative, act_forward

__all__ = ["up_kernel", "down_kernel", "wgrad_kernel"]


@triton.jit
def _expert_blocks(OFFSETS, NUM_EXPERTS, BM: tl.constexpr, E_PAD: tl.constexpr):
    """Each expert's first and end row, and its row blocks of BM (ceil(rows / BM)), in [E_PAD]
    vectors (zeros past the last expert)."""
    es = tl.arange(0, E_PAD)
    lo = tl.load(OFFSETS + es, mask=es < NUM_EXPERTS, other=0).to(tl.int32)
    hi = tl.load(OFFSETS + es + 1, mask=es < NUM_EXPERTS, other=0).to(tl.int32)
    return es, lo, hi, (hi - lo + BM - 1) // BM


@triton.jit
def _tile_count(OFFSETS, NUM_EXPERTS, N, BM: tl.constexpr, BN: tl.constexpr, E_PAD: tl.constexpr):
    """The row blocks that hold rows, and the output tiles of BM x BN they make (persistent
    programs loop over exactly these)."""
    _, _, _, blocks = _expert_blocks(OFFSETS, NUM_EXPERTS, BM, E_PAD)
    m_blocks = tl.sum(blocks, 0)
    return m_blocks, m_blocks * tl.cdiv(N, BN)


@triton.jit
def _tile(t, OFFSETS, NUM_EXPERTS, N, M_BLOCKS, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
          E_PAD: tl.constexpr):
    """Output tile t's expert (-1: no work), its first row and rows, its first column and columns,
    and their masks.

    Row block b is found from the experts' row offsets alone (each expert's segment is cut into
    ceil(rows / BM) blocks, in expert order): the E + 1 offsets are read and summed, so no block
    table has to be built on the device before the launch. M_BLOCKS is the number of row blocks
    the tiles are numbered over: an upper bound known on the host (one program per tile; blocks
    past the experts' last get -1) or the exact count (`_tile_count`, persistent programs).

    Rows are 32-bit (row counts are far below 2^31); callers widen them before multiplying by a
    row length.

    Tiles are numbered GROUP_M row blocks by every column block in turn (the grouped order of
    Triton's matmul tutorial), so the tiles in flight share a few row blocks and a few weight tiles
    in L2 instead of streaming all the rows once per column block.
    """
    n_blocks = tl.cdiv(N, BN)
    first = (t // (GROUP_M * n_blocks)) * GROUP_M
    size = tl.minimum(M_BLOCKS - first, GROUP_M)
    block = first + (t % (GROUP_M * n_blocks)) % size
    es, lo, hi, blocks = _expert_blocks(OFFSETS, NUM_EXPERTS, BM, E_PAD)
    ends = tl.cumsum(blocks, 0)  # row blocks of experts 0..e
    e = tl.sum((ends <= block).to(tl.int32), 0)  # the expert whose blocks cover `block`
    mine = es == e
    r0 = tl.sum(tl.where(mine, lo + (block - (ends - blocks)) * BM, 0), 0)
    end = tl.sum(tl.where(mine, hi, 0), 0)
    e = tl.where(e < NUM_EXPERTS, e, -1).to(tl.int64)
    rows = r0 + tl.arange(0, BM)
    rmask = rows < end
    c0 = ((t % (GROUP_M * n_blocks)) // size) * BN
    cols = c0 + tl.arange(0, BN)
    return e, r0, rows, rmask, c0, cols, cols < N


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. DOT_F32: Triton's interpreter has no bfloat16 dot, so the operands go to
    float32 first (their products are exact there)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(A, a_off, r0, k0, rmask, kmask, DESC: tl.constexpr):
    """The [BM, BK] tile of row-major activations at (r0, k0): through a TMA descriptor or pointers."""
    if DESC:
        return A.load([r0.to(tl.int32), k0])
    else:
        return tl.load(A + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _load_b(B, b_off, e, k0, c0, kmask, cmask, DESC: tl.constexpr, B_NK: tl.constexpr,
            BK: tl.constexpr, BN: tl.constexpr):
    """The [BK, BN] tile of expert e's weight at (k0, c0): through a TMA descriptor (B_NK: the
    weight is stored [E, N, K], else [E, K, N]; out of bounds reads zero) or through pointers."""
    if DESC:
        if B_NK:
            return tl.trans(B.load([e.to(tl.int32), c0.to(tl.int32), k0]).reshape(BN, BK))
        else:
            return B.load([e.to(tl.int32), k0, c0.to(tl.int32)]).reshape(BK, BN)
    else:
        return tl.load(B + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _up_tile(
    A, A_IDX, A_SCALE, B1, B3, BIAS1, BIAS3, MASK, PRE, GATE, OUT1, OUT3,
    N, K, stride_am, stride_be, stride_bk, stride_bn, e, r0, rows, rmask, c0, cols, cmask,
    ACT: tl.constexpr, GATED: tl.constexpr, DUAL: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr,
    HAS_BIAS1: tl.constexpr, HAS_BIAS3: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    BACKWARD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, DESC: tl.constexpr,
    A_DESC: tl.constexpr, B_NK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] output tile of `up_kernel`."""
    if GATHER:
        src = tl.load(A_IDX + rows, mask=rmask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    ks = tl.arange(0, BK)
    a_off = src[:, None] * stride_am + ks[None, :]
    b_off = e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    if SCALE:
        s = tl.load(A_SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + ks) < K
        a = _load_rows(A, a_off, r0, k0, rmask, kmask, A_DESC)
        if SCALE:
            a = (a.to(tl.float32) * s[:, None]).to(a.dtype)
        acc1 = _mma(a, _load_b(B1, b_off, e, k0, c0, kmask, cmask, DESC, B_NK, BK, BN), acc1, DOT_F32, PRECISION)
        if DUAL:
            acc3 = _mma(a, _load_b(B3, b_off, e, k0, c0, kmask, cmask, DESC, B_NK, BK, BN), acc3, DOT_F32,
                        PRECISION)
        a_off += BK
        b_off += BK * stride_bk
    # Addresses: the tile's first row (a 64-bit scalar) plus 32-bit offsets within the tile. With
    # 64-bit rows and offsets per element a 64 x 256 SwiGLU tile spilled 520 bytes (sm_90, Triton 3.9), 80 so.
    base = r0.to(tl.int64) * N
    offs = (rows - r0)[:, None] * N + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if HAS_MASK:
        keep = tl.load(MASK + base + offs, mask=omask, other=0.0).to(tl.float32)
    if BACKWARD:
        # acc1 is dL/dh for h = act(pre) [* gate] [* mask]
        dh = acc1
        if HAS_MASK:
            dh = dh * keep
        pre = tl.load(PRE + base + offs, mask=omask, other=0.0).to(tl.float32)
        if GATED:
            tl.store(OUT3 + base + offs, (dh * act_forward(pre, ACT)).to(OUT3.dtype.element_ty), mask=omask)
            dh = dh * act_derivative(pre, ACT)
            u = tl.load(GATE + base + offs, mask=omask, other=0.0).to(tl.float32)
            tl.store(OUT1 + base + offs, (dh * u).to(OUT1.dtype.element_ty), mask=omask)
        else:
            tl.store(OUT1 + base + offs, (dh * act_derivative(pre, ACT)).to(OUT1.dtype.element_ty), mask=omask)
    else:
        # Round the pre-activations (and the gate) to the input dtype, as a torch linear layer
        # would; both accumulators are rounded before the activation, which then needs registers
        # for one float32 tile only (with both live, a SwiGLU tile of 64 x 256 spilled on sm_90).
        if HAS_BIAS1:
            acc1 += tl.load(BIAS1 + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        pre = acc1.to(OUT1.dtype.element_ty)
        if GATED:
            if HAS_BIAS3:
                acc3 += tl.load(BIAS3 + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            u = acc3.to(OUT1.dtype.element_ty)
        if SAVE:
            tl.store(PRE + base + offs, pre, mask=omask)
            if GATED:
                tl.store(GATE + base + offs, u, mask=omask)
        h = act_forward(pre.to(tl.float32), ACT)
        if GATED:
            h = h * u.to(tl.float32)
        if HAS_MASK:
            h = h * keep
        tl.store(OUT1 + base + offs, h.to(OUT1.dtype.element_ty), mask=omask)


@triton.jit
def up_kernel(
    A, A_IDX, A_SCALE, B1, B3, BIAS1, BIAS3, MASK, PRE, GATE, OUT1, OUT3,
    OFFSETS, NUM_EXPERTS, M_BLOCKS, PROGRAMS,
    N, K, stride_am, stride_be, stride_bk, stride_bn,
    ACT: tl.constexpr, GATED: tl.constexpr, DUAL: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr,
    HAS_BIAS1: tl.constexpr, HAS_BIAS3: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
    BACKWARD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, DESC: tl.constexpr,
    A_DESC: tl.constexpr, B_NK: tl.constexpr, PERSIST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr,
):
    if PERSIST:
        # PROGRAMS programs (one per multiprocessor) walk the tiles that hold rows; 2: with the
        # tile loop and the K loop flattened into one software pipeline.
        m_blocks, tiles = _tile_count(OFFSETS, NUM_EXPERTS, N, BM, BN, E_PAD)
        for t in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=PERSIST == 2):
            e, r0, rows, rmask, c0, cols, cmask = _tile(t, OFFSETS, NUM_EXPERTS, N, m_blocks, BM, BN, GROUP_M, E_PAD)
            _up_tile(A, A_IDX, A_SCALE, B1, B3, BIAS1, BIAS3, MASK, PRE, GATE, OUT1, OUT3,
                     N, K, stride_am, stride_be, stride_bk, stride_bn, e, r0, rows, rmask, c0, cols, cmask,
                     ACT, GATED, DUAL, GATHER, SCALE, HAS_BIAS1, HAS_BIAS3, HAS_MASK, SAVE, BACKWARD, DOT_F32,
                     PRECISION, DESC, A_DESC, B_NK, BM, BN, BK)
    else:
        e, r0, rows, rmask, c0, cols, cmask = _tile(tl.program_id(0), OFFSETS, NUM_EXPERTS, N, M_BLOCKS, BM, BN,
                                                    GROUP_M, E_PAD)
        if e < 0:
            return
        _up_tile(A, A_IDX, A_SCALE, B1, B3, BIAS1, BIAS3, MASK, PRE, GATE, OUT1, OUT3,
                 N, K, stride_am, stride_be, stride_bk, stride_bn, e, r0, rows, rmask, c0, cols, cmask,
                 ACT, GATED, DUAL, GATHER, SCALE, HAS_BIAS1, HAS_BIAS3, HAS_MASK, SAVE, BACKWARD, DOT_F32,
                 PRECISION, DESC, A_DESC, B_NK, BM, BN, BK)


@triton.jit
def _down_tile(
    A, A2, B, B2, BIAS, ROW_TOK, ROW_SCALE, OUT, Y,
    N, K, stride_be, stride_bk, stride_bn, e, r0, rows, rmask, c0, cols, cmask,
    DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, SCATTER: tl.constexpr,
    SAVE_Y: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    DESC: tl.constexpr, B_NK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] output tile of `down_kernel` (this program's share of K, with split-K)."""
    pid_k = tl.program_id(1)
    k_len = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_lo = pid_k * k_len
    k_hi = tl.minimum(K, k_lo + k_len)
    ks = k_lo + tl.arange(0, BK)
    # Pointers: the tile's first row (64-bit scalar) plus 32-bit offsets within the tile.
    if DESC:
        a_rows = A
        a2_rows = A2
    else:
        a_rows = A + r0.to(tl.int64) * K
        a2_rows = A2 + r0.to(tl.int64) * K
    a_off = (rows - r0)[:, None] * K + ks[None, :]
    b_off = e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kmask = (k0 - k_lo + ks) < k_hi
        # Split-K ranges are whole BK tiles, so a descriptor's tile never reaches into the next range.
        a = _load_rows(a_rows, a_off, r0, k0, rmask, kmask, DESC)
        acc = _mma(a, _load_b(B, b_off, e, k0, c0, kmask, cmask, DESC, B_NK, BK, BN), acc, DOT_F32, PRECISION)
        if DUAL:
            a2 = _load_rows(a2_rows, a_off, r0, k0, rmask, kmask, DESC)
            acc = _mma(a2, _load_b(B2, b_off, e, k0, c0, kmask, cmask, DESC, B_NK, BK, BN), acc, DOT_F32, PRECISION)
        a_off += BK
        b_off += BK * stride_bk
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(BIAS + e * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & cmask[None, :]
    base = r0.to(tl.int64) * N
    offs = (rows - r0)[:, None] * N + cols[None, :]
    if SAVE_Y:
        tl.store(Y + base + offs, acc.to(Y.dtype.element_ty), mask=omask)
    if SCALE:
        # y rounded to the input dtype, then weighted, as the reference's combine does
        s = tl.load(ROW_SCALE + rows, mask=rmask, other=0.0)
        if DESC:
            in_ty = A.dtype
        else:
            in_ty = A.dtype.element_ty
        acc = acc.to(in_ty).to(tl.float32) * s.to(in_ty).to(tl.float32)[:, None]
    if SCATTER:
        tok = tl.load(ROW_TOK + rows, mask=rmask, other=0).to(tl.int64)
        tl.atomic_add((OUT + tok * N)[:, None] + cols[None, :], acc, mask=omask)
    elif SPLIT_K == 1:
        tl.store(OUT + base + offs, acc.to(OUT.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(OUT + base + offs, acc, mask=omask)


@triton.jit
def down_kernel(
    A, A2, B, B2, BIAS, ROW_TOK, ROW_SCALE, OUT, Y,
    OFFSETS, NUM_EXPERTS, M_BLOCKS, PROGRAMS,
    N, K, stride_be, stride_bk, stride_bn,
    DUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, SCATTER: tl.constexpr,
    SAVE_Y: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    DESC: tl.constexpr, B_NK: tl.constexpr, PERSIST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, E_PAD: tl.constexpr,
):
    if PERSIST:
        m_blocks, tiles = _tile_count(OFFSETS, NUM_EXPERTS, N, BM, BN, E_PAD)
        for t in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=PERSIST == 2):
            e, r0, rows, rmask, c0, cols, cmask = _tile(t, OFFSETS, NUM_EXPERTS, N, m_blocks, BM, BN, GROUP_M, E_PAD)
            _down_tile(A, A2, B, B2, BIAS, ROW_TOK, ROW_SCALE, OUT, Y, N, K, stride_be, stride_bk, stride_bn,
                       e, r0, rows, rmask, c0, cols, cmask, DUAL, HAS_BIAS, SCALE, SCATTER, SAVE_Y, SPLIT_K,
                       DOT_F32, PRECISION, DESC, B_NK, BM, BN, BK)
    else:
        e, r0, rows, rmask, c0, cols, cmask = _tile(tl.program_id(0), OFFSETS, NUM_EXPERTS, N, M_BLOCKS, BM, BN,
                                                    GROUP_M, E_PAD)
        if e < 0:
            return
        _down_tile(A, A2, B, B2, BIAS, ROW_TOK, ROW_SCALE, OUT, Y, N, K, stride_be, stride_bk, stride_bn,
                   e, r0, rows, rmask, c0, cols, cmask, DUAL, HAS_BIAS, SCALE, SCATTER, SAVE_Y, SPLIT_K,
                   DOT_F32, PRECISION, DESC, B_NK, BM, BN, BK)


@triton.jit
def wgrad_kernel(
    A, A_IDX, A_SCALE, B, B_IDX, OUT, OFFSETS,
    M, N, stride_a, stride_b,
    GATHER_A: tl.constexpr, SCALE_A: tl.constexpr, GATHER_B: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_blocks = tl.cdiv(N, BN)
    ms = (pid // n_blocks) * BM + tl.arange(0, BM)
    ns = (pid % n_blocks) * BN + tl.arange(0, BN)
    mmask = ms < M
    nmask = ns < N
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK).to(tl.int64)
        rmask = rows < end
        if GATHER_A:
            ia = tl.load(A_IDX + rows, mask=rmask, other=0).to(tl.int64)
        else:
            ia = rows
        if GATHER_B:
            ib = tl.load(B_IDX + rows, mask=rmask, other=0).to(tl.int64)
        else:
            ib = rows
        at = tl.load(A + ia[:, None] * stride_a + ms[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        if SCALE_A:
            s = tl.load(A_SCALE + rows, mask=rmask, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * s[:, None]).to(A.dtype.element_ty)
        bt = tl.load(B + ib[:, None] * stride_b + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = _mma(tl.trans(at), bt, acc, DOT_F32, PRECISION)
    tl.store(OUT + e * M * N + ms[:, None] * N + ns[None, :], acc.to(OUT.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
