"""Fuzzing sparsify's promises: hypothesis mutates the files a user hands over (safetensors
headers, index.json, config.json of a dense checkpoint; sparsify.json of an output; an ONNX
graph) and, for every mutation, the command that reads the file either

- fails: a non-zero exit, exactly one line on stderr, no traceback, nothing written, no
  temporaries, every file that existed before unchanged; or
- succeeds: exit 0, and what it produced loads and computes what the (mutated) input computes
  when transformers / ONNX Runtime read it.

Derandomised (the same cases every run). `SPARSIFY_FUZZ_EXAMPLES` sets the examples per target
(default 25, 125 in all); the long run of BENCHMARKS.md is
`SPARSIFY_FUZZ_EXAMPLES=1000 python -m pytest tests/io/test_fuzz.py -q -s` (it prints the counts).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.io.promises import assert_one_line_failure, snapshot, temporaries

EXAMPLES = int(os.environ.get("SPARSIFY_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck), print_blob=True,
                # no shrinking: a broken promise is reported as found (shrinking one took minutes)
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
COUNTS: Counter = Counter()  # inputs tried / failed cleanly / succeeded, per target (printed at the end)

# JSON values a mutation puts in place of another: every JSON type, odd numbers included
# (NaN, Infinity and -Infinity are what Python's json writes for floats it cannot write as JSON).
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=6)


def _paths(value, prefix=()):
    """Every path into a JSON value (keys of objects, indices of lists)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def json_mutation(draw, doc):
    """`doc` with one value replaced, one key deleted or added, or its text cut or a byte changed."""
    kind = draw(st.sampled_from(["replace", "delete", "add", "truncate", "byte"]))
    text = json.dumps(doc)
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "byte":
        raw = bytearray(text.encode())
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    doc = json.loads(text)
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths[1:] if kind == "delete" and len(paths) > 1 else paths))
    parent, key = _walk(doc, path[:-1]), path[-1] if path else None
    if kind == "delete" and path:
        del parent[key]
    elif kind == "add" and isinstance(_walk(doc, path), dict):
        _walk(doc, path)[draw(st.text(max_size=8))] = draw(_VALUES)
    elif path:
        parent[key] = draw(_VALUES)
    else:
        doc = draw(_VALUES)
    return json.dumps(doc).encode()  # allow_nan: NaN/Infinity as Python writes them, which is not JSON


def _walk(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def header_mutation(draw, raw: bytes):
    """A safetensors file with its JSON header mutated (the length prefix fixed, or not)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    kind = draw(st.sampled_from(["json", "length", "truncate"]))
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    new = draw(json_mutation(header))
    pad = draw(st.booleans()) and len(new) < n  # keep the data where it was, as a tool editing in place would
    new = new.ljust(n) if pad else new
    return struct.pack("<Q", len(new)) + new + body


@st.composite
def onnx_mutation(draw, raw: bytes):
    """An ONNX file with a byte changed, cut short, or one field of the model changed."""
    import onnx

    kind = draw(st.sampled_from(["byte", "truncate", "initializer", "dims", "node"]))
    if kind == "byte":
        data = bytearray(raw)
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    model = onnx.load_from_string(raw)
    g = model.graph
    if kind == "initializer":
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
    elif kind == "dims":
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        if t.dims:
            t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.integers(0, 1 << 20))
    else:
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        node.op_type = draw(st.sampled_from(["MatMul", "Relu", "Gelu", "Nope", "Add", ""]))
    return model.SerializeToString()


def _cli(*args) -> tuple[int, str, str]:
    from sparsify.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pristine inputs: a sharded dense llama, its native output, a dense ONNX graph."""
    from sparsify.io.demo import build_demo
    from sparsify.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("fuzz")
    build_demo("llama").save_pretrained(root / "dense", max_shard_size="300KB")
    assert _cli("upcycle", root / "dense", "--experts", "2", "-o", root / "out")[0] == 0
    export_onnx(build_demo("gpt2"), root / "dense.onnx", target="standard")
    yield root
    print(f"\nfuzz counts (examples per target {EXAMPLES}): {dict(sorted(COUNTS.items()))}")


def _fresh(world: Path, work: Path, name: str) -> Path:
    dst = work / name
    (shutil.copytree if (world / name).is_dir() else shutil.copy)(world / name, dst)
    return dst


def _check(target: str, code: int, out: str, err: str, work: Path, before: dict, made: Path, success) -> None:
    COUNTS[f"{target}: inputs"] += 1
    if code == 0:
        COUNTS[f"{target}: succeeded"] += 1
        success()
    else:
        COUNTS[f"{target}: refused"] += 1
        assert_one_line_failure(code, out, err)
        assert not (made.exists() or made.is_symlink()), "a failed run wrote its output"
        assert snapshot(work) == before, "a failed run changed the user's files"
    assert not temporaries(work)


def _dense_matches(dense: Path, out: Path, pristine: Path) -> None:
    """The output loads and computes what transformers makes of the (mutated) dense checkpoint."""
    import sparsify
    from sparsify.io.sources import load_pretrained
    from sparsify.verify import compare

    from sparsify.errors import SparsifyError

    moe = sparsify.load(out)
    try:  # transformers' reading of the mutated checkpoint
        ref = load_pretrained(dense, str(dense))
    except SparsifyError:  # a config value transformers refuses but that does not change the model
        ref = load_pretrained(pristine, str(pristine))
    assert compare(ref, moe).within()


def _work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("case")


@pytest.mark.parametrize("target", ["safetensors header", "index.json", "config.json"])
def test_mutated_dense_checkpoint(world, tmp_path_factory, target):
    index = json.loads((world / "dense" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    raw_shard = (world / "dense" / shard).read_bytes()
    config = json.loads((world / "dense" / "config.json").read_text())
    strategy = {"safetensors header": header_mutation(raw_shard), "index.json": json_mutation(index),
                "config.json": json_mutation(config)}[target]
    file = {"safetensors header": shard, "index.json": "model.safetensors.index.json",
            "config.json": "config.json"}[target]

    @FUZZ
    @given(strategy)
    def case(data: bytes) -> None:
        work = _work(tmp_path_factory)
        dense = _fresh(world, work, "dense")
        (dense / file).write_bytes(data)
        before = snapshot(work)
        code, out, err = _cli("upcycle", dense, "--experts", "2", "-o", work / "out")
        _check(target, code, out, err, work, before, work / "out", lambda: _dense_matches(dense, work / "out", world / "dense"))
        shutil.rmtree(work)

    case()


def test_mutated_sparsify_json(world, tmp_path_factory):
    """`verify DENSE OUT` on an output whose sparsify.json was edited: refused in one line, or an
    answer that loading the output bears out (match: it loads and matches; MISMATCH: a verdict,
    never a traceback: an edited plan may route otherwise, which verify then explains)."""
    manifest = json.loads((world / "out" / "sparsify.json").read_text())

    @FUZZ
    @given(json_mutation(manifest))
    def case(data: bytes) -> None:
        work = _work(tmp_path_factory)
        out = _fresh(world, work, "out")
        (out / "sparsify.json").write_bytes(data)
        before = snapshot(work)
        code, stdout, err = _cli("verify", world / "dense", out)
        if code == 1:
            COUNTS["sparsify.json: inputs"] += 1
            COUNTS["sparsify.json: mismatch explained"] += 1
            assert "MISMATCH" in stdout and "Traceback" not in err + stdout and snapshot(work) == before
        else:
            _check("sparsify.json", code, stdout, err, work, before, work / "none", lambda: _loads_and_matches(world, out))
        shutil.rmtree(work)

    case()


def _loads_and_matches(world: Path, out: Path) -> None:
    import sparsify
    from sparsify.io.sources import load_pretrained
    from sparsify.verify import compare

    assert compare(load_pretrained(world / "dense", "dense"), sparsify.load(out)).within()


def test_mutated_onnx(world, tmp_path_factory):
    raw = (world / "dense.onnx").read_bytes()

    @FUZZ
    @given(onnx_mutation(raw))
    def case(data: bytes) -> None:
        work = _work(tmp_path_factory)
        src = work / "dense.onnx"
        src.write_bytes(data)
        before = snapshot(work)
        code, out, err = _cli("upcycle", src, "--experts", "2", "-o", work / "moe.onnx", "--target", "standard")
        _check("onnx", code, out, err, work, before, work / "moe.onnx", lambda: _onnx_matches(src, work / "moe.onnx"))
        shutil.rmtree(work)

    case()


def _onnx_matches(src: Path, out: Path) -> None:
    from sparsify.onnx.compare import compare_onnx

    assert compare_onnx(src, out).within()
