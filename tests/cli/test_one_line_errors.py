"""Every error a user can cause named in issue 11, in the CLI and in the Python API: one line,
a non-zero exit (a `SparsifyError` in Python, speaking of arguments), no traceback, nothing
written, nothing of the user's changed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import sparsify
from sparsify.errors import SparsifyError
from tests.io.promises import assert_one_line_failure, snapshot, temporaries


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dense llama checkpoint, its native output, a dense BERT, and ONNX graphs with external data."""
    import onnx

    from sparsify.cli.main import main
    from sparsify.io.demo import build_demo
    from sparsify.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("world")
    build_demo("llama").save_pretrained(root / "dense")
    build_demo("bert").save_pretrained(root / "bert")
    assert main(["upcycle", str(root / "dense"), "--experts", "4", "-o", str(root / "out")]) == 0
    export_onnx(build_demo("gpt2"), root / "plain.onnx", target="standard")
    model = onnx.load(root / "plain.onnx")
    onnx.save(model, root / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return root


def _damage(world: Path, tmp: Path, edit) -> Path:
    """A copy of the native output with its sparsify.json edited by `edit(dict)`."""
    out = tmp / "damaged"
    shutil.copytree(world / "out", out)
    data = json.loads((out / "sparsify.json").read_text())
    edit(data)
    (out / "sparsify.json").write_text(json.dumps(data))
    return out


def _experts(data: dict, n: int) -> None:
    for layer in data["plan"]["layers"].values():
        layer["moe"]["num_experts"] = n


def _onnx(world: Path, tmp: Path, how: str) -> Path:
    for f in ("ext.onnx", "ext.onnx.data"):
        shutil.copy(world / f, tmp / f)
    data = tmp / "ext.onnx.data"
    if how == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return tmp / "ext.onnx"


DAMAGED = {
    "no plan": (lambda d: d.pop("plan"), "has no plan"),
    "plan a list": (lambda d: d.__setitem__("plan", []), "a plan that is a list"),
    "plan a string": (lambda d: d.__setitem__("plan", "x"), "a plan that is a str"),
    "layers a list": (lambda d: d["plan"].__setitem__("layers", []), "damaged plan"),
    "edited num_experts": (lambda d: _experts(d, 8), "experts"),
    "num_experts a string": (lambda d: _experts(d, "four"), "damaged plan"),
    "format unknown": (lambda d: d.__setitem__("format", "nope"), "nope"),
}

# name -> (argv(world, tmp) for the CLI, what the one line says)
CASES = {
    **{f"sparsify.json: {k} ({cmd})": (lambda w, t, e=edit, c=cmd: [*c, _damage(w, t, e)], match)
       for k, (edit, match) in DAMAGED.items()
       for cmd in (("inspect",), ("verify",))},
    **{f"sparsify.json: {k} (verify DENSE OUT)": (lambda w, t, e=edit: ["verify", w / "dense", _damage(w, t, e)], match)
       for k, (edit, match) in DAMAGED.items()},
    "onnx: external data missing (upcycle)": (
        lambda w, t: ["upcycle", _onnx(w, t, "missing"), "--experts", "4", "-o", t / "moe.onnx"], "ext.onnx.data"),
    "onnx: external data truncated (upcycle)": (
        lambda w, t: ["upcycle", _onnx(w, t, "truncated"), "--experts", "4", "-o", t / "moe.onnx"], "ext.onnx.data"),
    "onnx: external data missing (verify)": (
        lambda w, t: ["verify", w / "plain.onnx", _onnx(w, t, "missing")], "ext.onnx.data"),
    "onnx: external data truncated (inspect)": (lambda w, t: ["inspect", _onnx(w, t, "truncated")], "ext.onnx.data"),
    "verify across two architectures": (lambda w, t: ["verify", w / "bert", w / "out"], "made from a llama model"),
    "verify a qwen2 against a llama output": (lambda w, t: ["verify", "demo:qwen2", w / "out"], "llama model"),
    "verify a dense model against itself of another kind": (lambda w, t: ["verify", w / "bert", w / "dense"], "its dense source"),
    "upcycling an output that is already MoE": (
        lambda w, t: ["upcycle", w / "out", "--experts", "4", "-o", t / "again"], "already an MoE"),
    "-o .": (lambda w, t: ["upcycle", w / "dense", "--experts", "4", "-o", "."], "current directory"),
    "-o ..": (lambda w, t: ["upcycle", w / "dense", "--experts", "4", "-o", ".."], "above the current one"),
    **{f"--noise {v}": (lambda w, t, v=v: ["upcycle", "demo:llama", "--experts", "4", "--noise", v, "-o", t / "o"],
                        "noise must be a finite number") for v in ("inf", "nan", "-1")},
    **{f"--capacity-factor {v}": (lambda w, t, v=v: ["upcycle", "demo:llama", "-e", "4", "--capacity-factor", v,
                                                     "-o", t / "o"], "capacity") for v in ("nan", "inf", "-1", "0")},
    **{f"--drop-ratio {v}": (lambda w, t, v=v: ["upcycle", "demo:llama", "-e", "4", "--drop-ratio", v, "-o", t / "o"],
                             "drop-ratio") for v in ("nan", "inf", "-0.5", "2")},
    **{f"--shared-fraction {v}": (lambda w, t, v=v: ["upcycle", "demo:llama", "-e", "4", "--shared-fraction", v,
                                                     "-o", t / "o"], "shared") for v in ("nan", "inf", "-0.5", "1")},
    **{f"verify --atol {v}": (lambda w, t, v=v: ["verify", w / "dense", w / "out", "--atol", v], "--atol")
       for v in ("-1", "nan", "inf")},
    **{f"--shard-size {v}": (lambda w, t, v=v: ["upcycle", "demo:llama", "-e", "4", "--shard-size", v, "-o", t / "o"],
                             "shard size") for v in ("nan", "inf", "1e400")},
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_for_every_user_error(world, tmp_path, monkeypatch, sparsify_cli, case):
    make, match = CASES[case]
    work = tmp_path / "cwd" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # for -o . and -o ..
    args = make(world, tmp_path)
    before = snapshot(world, tmp_path)
    code, out, err = sparsify_cli(*args)
    assert_one_line_failure(code, out, err, match)
    assert snapshot(world, tmp_path) == before, "a failing command changed or left files"
    assert not temporaries(tmp_path) and not temporaries(work.parent)


# The Python API: the same damage, a SparsifyError (never KeyError, AttributeError, JSONDecodeError ...)
# whose message speaks of arguments, not of the command line's flags.
API = {
    **{f"load: {k}": (lambda w, t, e=edit: sparsify.load(_damage(w, t, e)), match) for k, (edit, match) in DAMAGED.items()},
    "load: not JSON": (lambda w, t: _load_text(w, t, "{not json"), "not valid JSON"),
    "load: a dense checkpoint": (lambda w, t: sparsify.load(w / "dense"), "not a model written by sparsify"),
    "upcycle: an output that is already MoE": (lambda w, t: sparsify.upcycle(str(w / "out"), experts=4), "already"),
    "upcycle: noise nan": (lambda w, t: sparsify.upcycle("demo:llama", experts=4, noise=float("nan")), "noise"),
    "save: onto its source": (lambda w, t: sparsify.save(sparsify.load(w / "out"), w / "out", force=True), "out"),
}


def _load_text(world: Path, tmp: Path, text: str):
    out = tmp / "damaged"
    shutil.copytree(world / "out", out)
    (out / "sparsify.json").write_text(text)
    return sparsify.load(out)


@pytest.mark.parametrize("case", list(API))
def test_python_api_raises_sparsify_errors(world, tmp_path, case):
    call, match = API[case]
    before = snapshot(world)
    with pytest.raises(SparsifyError) as info:
        call(world, tmp_path)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    # arguments, not flags; a flag only beside its argument ("--force / force=True")
    assert not re.search(r"--[a-z][a-z-]*(?! /)\b(?! /)", message), f"the Python API speaks of arguments: {message}"
    assert snapshot(world) == before
