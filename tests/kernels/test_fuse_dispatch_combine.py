"""The `fuse-dispatch-combine` pass, and `upcycle` / `load` choosing kernels by device."""

from __future__ import annotations

import pytest
import torch

import sparsify
from sparsify import PassManager, passes
from sparsify.errors import OptionError
from sparsify.moe import SparseMoE

from .cases import DEVICE


def _backends(model) -> set[str]:
    return {m.backend for m in model.modules() if isinstance(m, SparseMoE)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def upcycled():
    model = sparsify.upcycle("demo:llama", experts=8, top_k=2, every=1, backend="reference", router_init_std=0.5)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    return model.to(DEVICE), ids.to(DEVICE)


def test_auto_picks_the_device_backend_and_preserves_outputs(upcycled) -> None:
    model, ids = upcycled
    assert _backends(model) == {"reference"}
    before = _logits(model, ids)
    fuse = passes.FuseDispatchCombine()
    result = PassManager([fuse]).run(model)
    expected = "cpu" if DEVICE == "cpu" else "triton"
    assert result.modified and _backends(result.model) == {expected}
    assert set(fuse.chosen.values()) == {expected} and len(fuse.chosen) == 4
    torch.testing.assert_close(_logits(result.model, ids), before, rtol=1e-4, atol=1e-4)
    assert not PassManager([passes.FuseDispatchCombine()]).run(model).modified  # already lowered
    PassManager([passes.FuseDispatchCombine("reference")]).run(model)
    assert _backends(model) == {"reference"}


def test_a_named_backend_that_cannot_run_names_the_layer(upcycled, monkeypatch) -> None:
    model, _ = upcycled
    other = "triton" if DEVICE == "cpu" else "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(OptionError, match=r"MoE layer 'model\.layers\.0\.mlp': kernel backend"):
        PassManager([passes.FuseDispatchCombine(other)]).run(model)


def test_unknown_backend_fails_before_loading() -> None:
    with pytest.raises(OptionError, match="unknown kernel backend 'fastest'"):
        passes.FuseDispatchCombine("fastest")
    with pytest.raises(OptionError, match="unknown kernel backend"):
        sparsify.upcycle("demo:nonexistent", backend="fastest")


def test_upcycle_and_load_use_auto_by_default(tmp_path) -> None:
    model = sparsify.upcycle("demo:gpt2", experts=4, top_k=2, every=2)
    assert _backends(model) == {"cpu"}
    sparsify.save(model, tmp_path / "moe")
    assert _backends(sparsify.load(tmp_path / "moe")) == {"cpu"}
    assert _backends(sparsify.load(tmp_path / "moe", backend="reference")) == {"reference"}
