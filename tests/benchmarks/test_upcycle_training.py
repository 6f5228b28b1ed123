"""`benchmarks/upcycle_training.py` at its tiny setting: the experiment is what it says it is (every
arm learns, every arm trains on the same batches, upcycling starts exactly where the dense model
stands), whatever the figures of a real run turn out to be."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import sparsify

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "upcycle_training.py"


def _script():
    spec = importlib.util.spec_from_file_location("upcycle_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _has_drop_upcycling() -> bool:
    """Whether `sparsify.upcycle` takes `drop_ratio` (Drop-Upcycling, being added on main)."""
    ffn = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    net = torch.nn.Sequential(ffn)  # the FFN must be a submodule to be found
    try:
        sparsify.upcycle(net, experts=2, top_k=1, every=1, drop_ratio=0.5, example_inputs=(torch.randn(2, 4),))
    except TypeError as err:
        if "drop_ratio" in str(err):
            return False
        raise
    return True


def _run(tmp_path: Path, arms: str) -> tuple[dict[str, list[dict]], dict[str, dict], Path]:
    assert _script().main(["--setting", "tiny", "--arms", arms, "--out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "upcycle_training_tiny.jsonl").read_text().splitlines()]
    curves: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    for row in lines[1:]:
        if row.get("summary"):
            summaries[row["arm"]] = row
        else:
            assert {"arm", "extra_flops", "heldout_loss"} <= set(row)
            curves.setdefault(row["arm"], []).append(row)
    assert lines[0]["setting"] == "tiny" and lines[0]["arms"] == arms.split(",")
    return curves, summaries, tmp_path / "upcycle_training_tiny.png"


def _check_learns_on_the_same_batches(curves, summaries) -> None:
    pretrain = summaries["pretrain"]
    for arm, summary in summaries.items():
        assert summary["heldout_loss"] < summary["heldout_loss_start"], (arm, summary)  # every arm learns
        assert [r["extra_flops"] for r in curves[arm]] == sorted(r["extra_flops"] for r in curves[arm])
        # the same batches in the same order: the extra phase's are one sequence for every arm,
        # and the from-scratch arm's pretraining phase is the dense pretraining's
        assert summary["batches_sha256"]["extra"] == summaries["dense"]["batches_sha256"]["extra"] or arm == "pretrain"
    assert pretrain["batches_sha256"]["extra"] is None and summaries["dense"]["batches_sha256"]["pretrain"] is None
    if "scratch" in summaries:
        assert summaries["scratch"]["batches_sha256"]["pretrain"] == pretrain["batches_sha256"]["pretrain"]
    # the continued arms start from the pretrained model, at zero extra FLOPs
    for arm in set(summaries) - {"pretrain", "scratch"}:
        assert curves[arm][0]["extra_flops"] == 0.0 and curves[arm][0]["step"] == pretrain["steps"]


def test_dense_upcycled_and_scratch_arms(tmp_path):
    curves, summaries, png = _run(tmp_path, "dense,upcycled,scratch")
    _check_learns_on_the_same_batches(curves, summaries)
    dense, upcycled, scratch = summaries["dense"], summaries["upcycled"], summaries["scratch"]
    # upcycling preserves the function: the upcycled arm starts at the dense arm's loss, exactly
    assert curves["upcycled"][0]["heldout_loss"] == curves["dense"][0]["heldout_loss"]
    assert dense["heldout_loss_start"] == summaries["pretrain"]["heldout_loss"]
    # top-2 of 8 experts: more FLOPs per token than dense, fewer active than total parameters
    assert upcycled["flops_per_token"] > dense["flops_per_token"]
    assert dense["active_params"] < upcycled["active_params"] < upcycled["total_params"]
    assert scratch["total_params"] == upcycled["total_params"] and scratch["steps"] == summaries["pretrain"]["steps"] + dense["steps"]
    assert curves["scratch"][0]["extra_flops"] == -summaries["pretrain"]["tokens"] * dense["flops_per_token"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not _has_drop_upcycling(), reason="needs sparsify.upcycle(..., drop_ratio=) (Drop-Upcycling, on main)")
def test_drop_upcycled_arm(tmp_path):
    curves, summaries, _ = _run(tmp_path, "dense,drop-upcycled")
    _check_learns_on_the_same_batches(curves, summaries)
    # half of each expert's neurons are re-initialised: it starts away from the dense model
    assert curves["drop-upcycled"][0]["heldout_loss"] != curves["dense"][0]["heldout_loss"]
