"""Every fast backend's fused `moe_ffn` equals the reference: outputs and all gradients.

float32: to 1e-5 (the same math, summed in another order). float16 / bfloat16: measured against
a float64 reference, each backend's error may be at most twice the reference backend's own error
in that precision, or 4 ulp of the output's scale, whichever is larger.
"""

from __future__ import annotations

import pytest
import torch


from .cases import (CASES, FAST_BACKENDS, Case, assert_inference_matches_reference, assert_matches_reference,
                    make_experts, make_pairs, run_moe)

HALF_CASES = [c for c in CASES if c.name in ("top2-gated", "top1-dense-bias", "uneven")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float32_equals_reference(backend: str, case: Case) -> None:
    experts = make_experts(case)
    pairs = make_pairs(case)
    assert run_moe(backend, experts, *pairs)[0].shape == (case.tokens, case.hidden)
    assert_matches_reference(backend, experts, *pairs)


def _error(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth).abs().max().item() if truth.numel() else 0.0


@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_as_accurate_as_reference(backend: str, dtype: torch.dtype, case: Case) -> None:
    x, tok, exp, w = make_pairs(case)
    y64, g64 = run_moe("reference", make_experts(case, torch.float64), x.double(), tok, exp, w.double())
    half = make_experts(case, dtype)
    y_ref, g_ref = run_moe("reference", half, x.to(dtype), tok, exp, w)
    y, g = run_moe(backend, half, x.to(dtype), tok, exp, w)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    for name, got, ref, truth in [("y", y, y_ref, y64)] + [(n, g[n], g_ref[n], g64[n]) for n in g64]:
        assert got.dtype == ref.dtype, name
        allowed = max(2 * _error(ref, truth), 4 * eps * truth.abs().max().item())
        assert _error(got, truth) <= allowed, f"{name}: error {_error(got, truth):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inference_path_equals_reference(backend: str, case: Case) -> None:
    """Inference takes its own path (no activations saved; in the cpu backend the gather and, for
    top-1, the combine run inside the expert loop): it gives the same output."""
    assert_inference_matches_reference(backend, make_experts(case), *make_pairs(case))


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("top2-gated", "top1-dense-bias", "uneven")],
                         ids=lambda c: c.name)
def test_triton_pointer_path_equals_reference(case: Case, monkeypatch) -> None:
    """The Triton kernels read weights through TMA descriptors where they can; the pointer loads
    (older GPUs, unaligned shapes, tiles the tuner prefers) must agree too, forward and backward.
    Here every operand is declared unfit for descriptors, as an unaligned one is, on a GPU too."""
    from sparsify.kernels.triton import ops

    monkeypatch.setattr(ops, "_desc_ok", lambda *tensors: False)
    assert_matches_reference("triton", make_experts(case), *make_pairs(case))


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not installed")
def test_triton_unaligned_shapes_equal_reference() -> None:
    """Hidden and FFN sizes whose rows are not 16-byte multiples cannot be read by TMA: the
    kernels fall back to pointer loads and still agree."""
    case = Case("unaligned", 9, 4, 2, hidden=30, inter=45)
    assert_matches_reference("triton", make_experts(case), *make_pairs(case))


VARIANT_CASES = [c for c in CASES if c.name in ("top2-gated", "top1-dense-bias", "uneven", "empty-experts")]


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("variant", ["persistent", "persistent-flattened", "rows-through-descriptors"])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: c.name)
def test_triton_tuning_variants_equal_reference(case: Case, variant: str, monkeypatch) -> None:
    """The tuner's other kinds of candidates compute the same: persistent programs (a few
    programs looping over the tiles, with the loops flattened or not; the interpreter launches
    three) and the first kernel's rows read through a TMA descriptor after a gathering copy."""
    from sparsify.kernels.triton import tuning

    default = tuning.INTERPRETER
    if variant == "rows-through-descriptors":
        changed = {"up": default["up"]._replace(rows_desc=1)}
    else:
        persist = 1 if variant == "persistent" else 2
        changed = {"up": default["up"]._replace(persist=persist), "down": default["down"]._replace(persist=persist)}
    monkeypatch.setattr(tuning, "INTERPRETER", {**default, **changed})
    assert_matches_reference("triton", make_experts(case), *make_pairs(case))
    assert_inference_matches_reference("triton", make_experts(case), *make_pairs(case))
