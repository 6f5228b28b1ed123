"""Streamed verify (one MoE layer's experts at a time) against the in-memory comparison, and
what it finds in a damaged output or against the wrong dense model."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import sparsify
from sparsify.streaming.verify import compare_streamed
from sparsify.verify import compare

from .conftest import CASES, PAIRS, case_id

# recipes whose MoE model computes what the dense model computes (but in the switch format,
# which routes top-1 and scales each token's output by its router probability)
PRESERVING = {"copy", "granularity-2", "shared-0.25"}


def _preserving(fmt: str, recipe: str) -> bool:
    return recipe in PRESERVING and fmt != "switch"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_streamed_verify_equals_the_in_memory_comparison(upcycled, demo, case):
    family, fmt, recipe = case
    out = upcycled(*case)
    want = compare(demo(family), sparsify.load(out, backend="reference"))
    got = compare_streamed(demo(family), out)
    assert got.max_ref == want.max_ref  # the same dense model on the same inputs
    if (fmt, recipe) == ("switch", "capacity-1.0"):  # capacity per sequence: transformers computes otherwise
        assert got.note and "capacity" in got.note and got.max_abs != want.max_abs
        return
    assert got.note is None
    if fmt == "native":  # the same tensors through the same kernels: the same numbers
        assert got.max_abs == want.max_abs
    else:  # transformers' own MoE blocks compute in another order
        assert abs(got.max_abs - want.max_abs) <= 1e-5 * want.max_ref, (got.max_abs, want.max_abs)
    assert got.within() == want.within() == (_preserving(fmt, recipe) or got.max_abs <= 1e-5 * got.max_ref)
    plan = sparsify.load(out).sparsify_plan if fmt == "native" else None
    if plan is not None:
        assert [d.module for d in got.layers] == list(plan.selected)  # every MoE layer compared on its own
    assert got.layers and all(d.max_abs <= 1e-5 * max(d.max_ref, 1e-30) for d in got.layers) == _preserving(fmt, recipe)
    assert got.problems == [] and got.tensors_checked > 0 and got.config_differing == []


def _tensor_offsets(path):
    """name -> (absolute begin, end, dtype) of each tensor of a safetensors file (its header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1], v["dtype"]) for k, v in header.items()}


def _damage(out, pick):
    """Add 1 to the first element of the last non-empty stored tensor whose name `pick` accepts (same size
    file: only the sha256 changes); returns its name."""
    for f in sorted(out.glob("*.safetensors"), reverse=True):
        offsets = _tensor_offsets(f)
        names = [k for k, (begin, end, _) in offsets.items() if pick(k) and end > begin]  # not an empty one
        if names:
            name = names[-1]
            begin, _, dtype = offsets[name]
            assert dtype == "F32"
            with open(f, "r+b") as fh:
                fh.seek(begin)
                (x,) = struct.unpack("<f", fh.read(4))
                fh.seek(begin)
                fh.write(struct.pack("<f", x + 1.0))
            return name
    raise AssertionError(f"no tensor to damage in {out}")


def _is_expert(name: str) -> bool:
    return ".experts." in name or "expert_" in name


@pytest.mark.parametrize("case", [(f, fmt, "copy") for f, fmt in PAIRS], ids=case_id)
def test_a_damaged_expert_tensor_is_named(upcycled, demo, tmp_path, case, sparsify_cli):
    out = tmp_path / "out"
    shutil.copytree(upcycled(*case), out)
    name = _damage(out, _is_expert)
    got = compare_streamed(demo(case[0]), out)
    assert [t.name for t in got.tensors_differing] == [name]
    assert got.tensors_differing[0].max_abs == pytest.approx(1.0, rel=1e-3)
    assert got.problems and f"'{name}'" in got.problems[0]
    code, stdout, _ = sparsify_cli("verify", f"demo:{case[0]}", out)
    assert code == 1 and "MISMATCH" in stdout and name in " ".join(stdout.split())


@pytest.mark.parametrize("case", [("t5", "native", "copy"), ("llama", "mixtral", "copy"), ("qwen2", "qwen2-moe", "copy")],
                         ids=case_id)
def test_a_damaged_dense_tensor_changes_the_outputs_and_is_named(upcycled, demo, tmp_path, case):
    out = tmp_path / "out"
    shutil.copytree(upcycled(*case), out)
    name = _damage(out, lambda k: not _is_expert(k) and "router" not in k and "gate.weight" not in k and k.endswith("weight")
                   and "norm" not in k)
    got = compare_streamed(demo(case[0]), out)
    assert name in [t.name for t in got.tensors_differing]
    assert not got.within() or got.problems


@pytest.mark.parametrize("case", [("t5", "native", "copy"), ("gpt2", "native", "shared-0.25"), ("mistral", "mixtral", "copy"),
                                  ("qwen3", "qwen2-moe", "copy"), ("t5", "switch", "copy")], ids=case_id)
def test_the_wrong_dense_model_is_a_mismatch(upcycled, demo, case, sparsify_cli):
    family = case[0]
    out = upcycled(*case)
    other = demo(family, seed=1)  # the same architecture, other weights
    got = compare_streamed(other, out)
    assert not got.within() and got.tensors_differing
    code, stdout, _ = sparsify_cli("verify", f"demo:{family}", out)  # the right one
    assert code == (0 if _preserving(case[1], case[2]) else 1) and "; 0 differ" in stdout, stdout


@pytest.mark.parametrize("dense,case", [("llama", ("qwen2", "native", "copy")), ("t5", ("bert", "native", "copy")),
                                        ("gpt2", ("t5", "switch", "copy"))], ids=lambda x: x if isinstance(x, str) else case_id(x))
def test_another_architecture_is_refused_in_one_line(upcycled, dense, case, sparsify_cli):
    code, stdout, stderr = sparsify_cli("verify", f"demo:{dense}", upcycled(*case))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code not in (0, 1) and len(lines) == 1 and lines[0].startswith("error:"), (code, stdout, stderr)
    assert "Traceback" not in stderr


def test_verify_leaves_the_dense_checkpoint_as_it_was(demo, tmp_path, sparsify_cli):
    # the streamed comparison writes the output's tensors into the dense model's memory, which
    # transformers maps from the checkpoint (privately: the file must not change)
    demo("t5").save_pretrained(tmp_path / "dense")
    before = {f.name: f.read_bytes() for f in (tmp_path / "dense").iterdir()}
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "-e", "4", "-f", "native", "-o", tmp_path / "moe", "-q")
    assert code == 0, err
    code, stdout, _ = sparsify_cli("verify", tmp_path / "dense", tmp_path / "moe")
    assert code == 0 and "; 0 differ" in stdout, stdout
    assert {f.name: f.read_bytes() for f in (tmp_path / "dense").iterdir()} == before
