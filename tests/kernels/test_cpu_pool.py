"""The CPU backend's expert-parallel path: worker threads with single-threaded BLAS."""

from __future__ import annotations

import threading

import pytest
import torch

from sparsify.kernels import BACKENDS
from sparsify.kernels.cpu.pool import expert_parallel_available, parallel_map

from .cases import Case, assert_inference_matches_reference, assert_matches_reference, make_experts, make_pairs


# Large enough (pairs x ffn x hidden) for the backend to hand the experts to worker threads and
# to run its GEMMs on the engine it measured fastest (oneDNN with packed weights, where it wins).
BIG = Case("big", 256, 8, 2, hidden=128, inter=1536)
BIG_TOP1 = Case("big-top1", 512, 8, 1, hidden=128, inter=1536, form="dense", activation="relu", bias=(True, True, False))

pytestmark = pytest.mark.skipif(not expert_parallel_available(), reason="torch without MKL/OpenMP thread controls")


def test_items_run_on_several_threads(two_threads) -> None:
    seen, lock = set(), threading.Lock()

    def work(i: int) -> None:
        x = torch.randn(256, 256)
        for _ in range(20):
            x = x @ x.t() / 256
        with lock:
            seen.add(threading.get_ident())

    parallel_map(work, range(8))
    assert len(seen) == 2 and threading.get_ident() not in seen


def test_worker_exception_reaches_the_caller(two_threads) -> None:
    def work(i: int) -> None:
        if i == 5:
            raise ValueError("expert 5 failed")

    with pytest.raises(ValueError, match="expert 5 failed"):
        parallel_map(work, range(8))


def test_expert_parallel_equals_reference(two_threads) -> None:
    assert_matches_reference("cpu", make_experts(BIG, device="cpu"), *make_pairs(BIG, device="cpu"))


@pytest.mark.parametrize("case", [BIG, BIG_TOP1], ids=lambda c: c.name)
def test_expert_parallel_under_inference_mode(two_threads, case) -> None:
    """Workers write into buffers the caller made in inference mode: they must be in it too.
    (Top-1: the workers also write the combined output rows; relu: fused into the GEMM.)"""
    assert_inference_matches_reference("cpu", make_experts(case, device="cpu"), *make_pairs(case, device="cpu"))


def test_caller_thread_settings_untouched(two_threads) -> None:
    experts = make_experts(BIG, device="cpu")
    BACKENDS["cpu"].moe_ffn(*make_pairs(BIG, device="cpu"), experts)
    assert torch.get_num_threads() == 2


def test_packed_weights_follow_in_place_updates(two_threads) -> None:
    """Inference packs the experts' weights once; changing them in place must repack."""
    experts = make_experts(BIG, device="cpu")
    pairs = make_pairs(BIG, device="cpu")
    for step in range(3):
        assert_inference_matches_reference("cpu", experts, *pairs)
        with torch.no_grad():
            experts.w1.mul_(1.5)  # what an optimizer step or load_state_dict does
            experts.w2.data = experts.w2.data.flip(0).contiguous()  # or a new tensor behind the parameter


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),  # transformers.Trainer's default
    lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
    lambda params: torch.optim.SGD(params, lr=0.1),
], ids=["adamw-fused", "adamw-foreach", "sgd"])
def test_packed_weights_follow_optimizer_steps(two_threads, optimizer) -> None:
    """A fused optimizer updates the weights in place without bumping their version counters:
    inference after its step must still use the new weights, not the copies packed before it."""
    experts = make_experts(BIG, device="cpu")
    pairs = make_pairs(BIG, device="cpu")
    opt = optimizer(experts.parameters())
    for step in range(3):
        assert_inference_matches_reference("cpu", experts, *pairs)
        for p in experts.parameters():
            p.grad = 0.01 * torch.randn_like(p)
        opt.step()
