"""Fixtures for the partition tests: upcycled demo models (captured once per session) and a
saved upcycled model whose routers are skewed on purpose."""

from __future__ import annotations

import pytest

from partition_workers import build_variant


@pytest.fixture(scope="session")
def plans() -> dict:
    """Upcycle plans (8 experts, every other FFN, noisy expert copies so that experts differ and
    router gradients are informative) for a dense-FFN and a gated-FFN architecture."""
    import sparsify

    return {name: sparsify.upcycle(f"demo:{name}", experts=8, top_k=2, noise=0.05).sparsify_plan.to_dict()
            for name in ("t5", "llama")}


@pytest.fixture(scope="session")
def skewed_moe(plans, tmp_path_factory):
    """A saved upcycled demo:t5 (top-2) whose routers send all tokens to experts 0..3."""
    import sparsify

    out = tmp_path_factory.mktemp("skewed") / "t5-moe"
    sparsify.save(build_variant("t5", plans["t5"], 2), out)
    return out
