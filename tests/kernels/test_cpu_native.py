"""The CPU backend's compiled float32 GEMM (`native`) and the inference forward built on it."""

from __future__ import annotations

import threading

import pytest
import torch

from sparsify.kernels import BACKENDS
from sparsify.kernels.cpu import native, native_ffn

from .cases import CASES, Case, assert_inference_matches_reference, make_experts, make_pairs

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.why_unavailable}")



def _expected(a, a_rows, w, n0, n1, k0, k1, bias, relu, scale):
    rows = a if a_rows is None else a[a_rows]
    out = rows[:, : k1 - k0].double() @ w[n0:n1, k0:k1].double().t()
    if bias is not None:
        out = out + bias.double()
    if relu:
        out = out.relu()
    if scale is not None:
        out = out * scale.double().unsqueeze(-1)
    return out.float()


@pytest.mark.parametrize("m", [1, 5, 6, 7, 64, 601])  # tiles of 1..6 rows; 601: two passes over the panels
@pytest.mark.parametrize("n,k", [(16, 3), (64, 768), (200, 1000), (130, 1537)])  # masked panels; K chunks
def test_gemm_matches_torch(m, n, k) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(1, n, k, generator=g) * k ** -0.5
    p = native.packed(w)[0]
    a = torch.randn(m + 3, k, generator=g)
    rows = torch.randperm(m + 3, generator=g)[:m]
    bias, scale = torch.randn(n, generator=g), torch.rand(m, generator=g)
    c = torch.full((m, n), float("nan"))
    native.gemm(a, rows, p, 0, n, 0, k, c, None, bias=bias, relu=True, scale=scale)
    torch.testing.assert_close(c, _expected(a, rows, w[0], 0, n, 0, k, bias, True, scale), rtol=1e-5, atol=1e-5)
    # contiguous rows in, scattered rows out, no epilogue
    out = torch.zeros(m + 3, n)
    native.gemm(a[:m], None, p, 0, n, 0, k, out, rows)
    want = torch.zeros(m + 3, n)
    want[rows] = _expected(a[:m], None, w[0], 0, n, 0, k, None, False, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_gemm_on_a_block_of_the_weight() -> None:
    """Columns n0:n1 (from a panel boundary) and inputs k0:k1 of W: how the FFN halves use it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 200, 300, generator=g) * 170 ** -0.5
    p = native.packed(w)[1]
    a = torch.randn(9, 170, generator=g)
    c = torch.empty(9, 200 - 64)
    native.gemm(a, None, p, 64, 200, 100, 270, c, None)
    torch.testing.assert_close(c, _expected(a, None, w[1], 64, 200, 100, 270, None, False, None), rtol=1e-5, atol=1e-5)


def test_packing_layout_and_cache() -> None:
    w = torch.randn(3, 70, 5)
    p = native.packed(w)
    assert p.shape == (3, 2, 5, 64)
    torch.testing.assert_close(p[:, 0].transpose(1, 2), w[:, :64])
    torch.testing.assert_close(p[:, 1, :, :6].transpose(1, 2), w[:, 64:])
    assert not p[:, 1, :, 6:].any()  # zero padding
    assert native.packed(w) is p
    with torch.no_grad():
        w.mul_(2)  # an in-place change (optimizer step, load): repacked
    assert native.packed(w) is not p


def test_add_rows() -> None:
    src, dst = torch.randn(4, 37), torch.randn(10, 37)
    rows = torch.tensor([7, 0, 3, 9])
    want = dst.clone()
    want[rows] += src
    native.add_rows(src, dst, rows)
    torch.testing.assert_close(dst, want)


def test_parallel_for_runs_every_item_on_torch_threads(two_threads) -> None:
    seen, threads, lock = [], set(), threading.Lock()

    def work(q: int) -> None:
        x = torch.randn(128, 128)
        for _ in range(10):
            x = (x @ x.t()).tanh()
        with lock:
            seen.append(q)
            threads.add(threading.get_ident())

    native.parallel_for(work, 40)
    assert sorted(seen) == list(range(40))
    assert len(threads) == 2 and threading.get_ident() in threads  # the caller works too


def test_parallel_for_reraises_and_runs_serially_when_asked(two_threads) -> None:
    def fail(q: int) -> None:
        if q == 3:
            raise ValueError("item 3 failed")

    with pytest.raises(ValueError, match="item 3 failed"):
        native.parallel_for(fail, 8)
    threads = set()
    native.parallel_for(lambda q: threads.add(threading.get_ident()), 8, workers=1)
    assert threads == {threading.get_ident()}


def test_parallel_for_follows_inference_mode(two_threads) -> None:
    modes = []
    with torch.inference_mode():
        native.parallel_for(lambda q: modes.append(torch.is_inference_mode_enabled()), 6)
    native.parallel_for(lambda q: modes.append(torch.is_inference_mode_enabled() or torch.is_grad_enabled()), 6)
    assert modes == [True] * 6 + [False] * 6


# Large enough to run on both threads with the last pieces cut in two along the ffn dimension
# (inter 200: the halves are 128 and 72 columns, the last panel partial); top-1 writes token rows.
NATIVE_CASES = [
    Case("top1-relu-bias-halves", 300, 8, 1, hidden=96, inter=200, form="dense", activation="relu",
         bias=(True, True, False)),
    Case("top2-gated-silu-halves", 300, 8, 2, hidden=96, inter=200, bias=(True, True, True)),
    Case("top1-gated-relu-skewed", 200, 6, 1, hidden=64, inter=256, activation="relu", loads="skewed"),
    Case("top1-gelu-dropped", 200, 6, 1, hidden=40, inter=130, form="dense", activation="gelu", loads="dropped"),
    Case("big", 512, 8, 2, hidden=128, inter=1536),
]


@pytest.mark.parametrize("case", CASES + NATIVE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_native_forward_equals_reference(two_threads, case, mode) -> None:
    experts = make_experts(case, device="cpu")
    pairs = make_pairs(case, device="cpu")
    counts = torch.tensor([3] + [0] * (case.experts - 2) + [4])  # grouped rows, an empty expert between
    grouped = torch.randn(7, case.hidden, generator=torch.Generator().manual_seed(3))
    e = experts
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        y = BACKENDS["cpu"].moe_ffn(*pairs, experts)
        y_ref = BACKENDS["reference"].moe_ffn(*pairs, experts)
        rows = BACKENDS["cpu"].grouped_ffn(grouped, counts, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3, activation=e.activation)
        rows_ref = BACKENDS["reference"].grouped_ffn(grouped, counts, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3,
                                                     activation=e.activation)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, rows_ref, rtol=1e-5, atol=1e-5)


def test_native_path_is_taken(two_threads, monkeypatch) -> None:
    calls = []
    real = native_ffn.native_forward
    monkeypatch.setattr(native_ffn, "native_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = NATIVE_CASES[0]
    with torch.inference_mode():
        BACKENDS["cpu"].moe_ffn(*make_pairs(case, device="cpu"), make_experts(case, device="cpu"))
    assert calls


@pytest.mark.parametrize("case", NATIVE_CASES[:2], ids=lambda c: c.name)
def test_without_native_kernel_equals_reference(two_threads, monkeypatch, case) -> None:
    """Where the library cannot be built, inference runs on oneDNN/MKL: still the reference's result."""
    monkeypatch.setattr(native, "available", lambda: False)
    assert_inference_matches_reference("cpu", make_experts(case, device="cpu"), *make_pairs(case, device="cpu"))


def test_half_precision_keeps_to_the_other_engines(two_threads) -> None:
    case = NATIVE_CASES[0]
    experts = make_experts(case, device="cpu").to(torch.bfloat16)
    x, tok, exp, weight = make_pairs(case, device="cpu")
    assert not native_ffn.supports(x.bfloat16(), experts.w1)
    with torch.inference_mode():
        y = BACKENDS["cpu"].moe_ffn(x.bfloat16(), tok, exp, weight, experts)
    assert y.dtype == torch.bfloat16


def test_rows_out_of_range_raise(two_threads) -> None:
    case = NATIVE_CASES[0]
    e = make_experts(case, device="cpu")
    with torch.inference_mode(), pytest.raises(ValueError, match="segments cover"):
        BACKENDS["cpu"].grouped_ffn(torch.randn(5, case.hidden), torch.tensor([3, 4] + [0] * (case.experts - 2)),
                                    e.w1, e.w2, e.w3, e.b1, e.b2, e.b3, activation=e.activation)


def test_clear_packed_drops_the_native_packing_too() -> None:
    """`gemm.clear_packed()`, the one switch the README names, frees every engine's packed copy."""
    from sparsify.kernels.cpu import gemm as gemm_module

    w = torch.randn(2, 100, 40)
    p = native.packed(w)
    gemm_module.clear_packed()
    assert native.packed(w) is not p
