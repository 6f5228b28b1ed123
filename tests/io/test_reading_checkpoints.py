"""Checkpoints are read as strictly as the safetensors library reads them, only the files the
index names (or the single weights file) are read, only regular files, and every problem is one
line naming the file, with nothing written and the source unchanged."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsify.errors import SourceError
from sparsify.io.safetensors_io import SafetensorsFile
from tests.io.promises import assert_one_line_failure, snapshot

F16 = b"\0" * 16


def _file(header, data: bytes = F16, raw: bytes | None = None, n: int | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _t(dtype="F32", shape=(4,), offsets=(0, 16), **extra):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


# name -> (file bytes, whether the safetensors library accepts it)
HEADERS = {
    "valid": (_file({"a": _t()}), True),
    "valid with metadata": (_file({"__metadata__": {"format": "pt"}, "a": _t()}), True),
    "null metadata": (_file({"__metadata__": None, "a": _t()}), True),
    "unsorted entries": (_file({"b": _t(shape=(2,), offsets=(8, 16)), "a": _t(shape=(2,), offsets=(0, 8))}), True),
    "empty tensor": (_file({"a": _t(), "e": _t("U8", (0,), (16, 16))}), True),
    "unknown field": (_file({"a": _t(z=1)}), True),
    "trailing spaces": (_file(None, raw=json.dumps({"a": _t()}).encode() + b"    "), True),
    "no tensors": (_file({}, b""), True),
    "metadata value not a string": (_file({"__metadata__": {"x": 1}, "a": _t()}), False),
    "metadata a list": (_file({"__metadata__": [1], "a": _t()}), False),
    "bytes after the data": (_file({"a": _t()}, F16 + b"\0" * 8), False),
    "data shorter than offsets": (_file({"a": _t()}, F16[:8]), False),
    "gap before a tensor": (_file({"a": _t(shape=(2,), offsets=(8, 16))}), False),
    "overlapping offsets": (_file({"a": _t(), "b": _t(shape=(2,), offsets=(8, 16))}), False),
    "negative offsets": (_file({"a": _t(offsets=(-16, 0))}), False),
    "float offsets": (_file({"a": _t(offsets=(0.0, 16.0))}), False),
    "data_offsets of one element": (_file({"a": _t(offsets=(16,))}), False),
    "data_offsets of three elements": (_file({"a": _t(offsets=(0, 16, 16))}), False),
    "boolean offset": (_file({"a": _t(offsets=(False, 16))}), False),
    "a string entry": (_file({"a": "hello"}), False),
    "a list header": (_file([1, 2]), False),
    "unknown dtype": (_file({"a": _t("F99")}), False),
    "lower-case dtype": (_file({"a": _t("f32")}), False),
    "negative shape": (_file({"a": _t(shape=(-4,))}), False),
    "float shape": (_file({"a": _t(shape=(4.0,))}), False),
    "no shape": (_file({"a": {"dtype": "F32", "data_offsets": [0, 16]}}), False),
    "bytes disagree with shape": (_file({"a": _t(shape=(3,))}), False),
    "shape overflows": (_file({"a": _t(shape=(2**62, 8))}), False),
    "bytes after the header": (_file(None, raw=json.dumps({"a": _t()}).encode() + b" x "), False),
    "empty header": (_file(None, raw=b""), False),
    "header not UTF-8": (_file(None, raw=b'{"\xff": {"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'), False),
    "empty file data": (_file({}, F16), False),
    "header length past the end": (_file({"a": _t()}, n=10**6), False),
    "header length past the limit": (_file({"a": _t()}, n=10**9), False),
    "shorter than 8 bytes": (b"\x10\0\0", False),
}
# Refused by sparsify although the library reads them: a key twice (which one would count?),
# and dtypes that no torch tensor of a transformers model holds.
STRICTER = {
    "duplicate tensor name": _file(None, raw=b'{"a": ' + json.dumps(_t()).encode() + b', "a": ' + json.dumps(_t()).encode() + b"}"),
    "4-bit dtype": _file({"a": _t("F4", (32,))}),
    "complex dtype": _file({"a": _t("C64", (2,))}),
}


def _library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:
        return False


@pytest.mark.parametrize("case", list(HEADERS))
def test_headers_are_judged_as_the_library_judges_them(tmp_path, case):
    data, accepted = HEADERS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert _library_accepts(path) == accepted  # the table says what the library does
    if accepted:
        sf = SafetensorsFile(path)
        for name in sf.tensors:
            assert sf.read(name).numel() == sf.tensors[name].nbytes // sf.tensors[name].dtype.itemsize
    else:
        with pytest.raises(SourceError, match="truncated or corrupt") as err:
            SafetensorsFile(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(STRICTER))
def test_headers_sparsify_refuses_beyond_the_library(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(STRICTER[case])
    assert _library_accepts(path)
    with pytest.raises(SourceError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_tensors_are_read_exactly(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors")
    sf = SafetensorsFile(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(sf.read(k), v)


# ---- whole checkpoints, through the CLI ----


@pytest.fixture
def dense(tmp_path, demo):
    d = tmp_path / "dense"
    demo("llama").save_pretrained(d)
    return d


@pytest.fixture
def sharded(tmp_path, demo):
    d = tmp_path / "sharded"
    demo("llama").save_pretrained(d, max_shard_size="100KB")
    return d


def _rewrite_header(path: Path, change) -> None:
    """Give safetensors file `path` the header `change(header)` returns, keeping its data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(change(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _same_size_pair(header: dict) -> tuple[str, str]:
    sizes: dict[int, str] = {}
    for k, v in header.items():
        if k != "__metadata__":
            size = v["data_offsets"][1] - v["data_offsets"][0]
            if size in sizes:
                return sizes[size], k
            sizes[size] = k
    raise AssertionError("no two tensors of one size")


def _set(header, name, **fields):
    header[name] = {**header[name], **fields}
    return header


def _overlap(header):
    a, b = _same_size_pair(header)
    return _set(header, b, data_offsets=header[a]["data_offsets"])


def _symlink(target: str):
    def damage(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to(target)
    return damage


def _replace(name: str, make):
    def damage(d: Path) -> None:
        (d / name).unlink()
        make(d / name)
    return damage


def _index(change):
    def damage(d: Path) -> None:
        index = d / "model.safetensors.index.json"
        index.write_text(change(json.loads(index.read_text())) if callable(change) else change)
    return damage


class _Exploit:
    """Pickles as a call of os.system: what torch.load(weights_only=True) must refuse."""

    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def _unsafe_bin(d: Path) -> None:
    from sparsify.io.demo import build_demo

    (d / "model.safetensors").unlink()
    torch.save({**build_demo("llama").state_dict(), "exploit": _Exploit()}, d / "pytorch_model.bin")


def _truncated_bin(d: Path) -> None:
    from sparsify.io.demo import build_demo

    (d / "model.safetensors").unlink()
    torch.save(build_demo("llama").state_dict(), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def _bad_header(change):
    return lambda d: _rewrite_header(d / "model.safetensors", change)


# name -> (damage to a single-file llama checkpoint, key words of the one line)
SINGLE = {
    "data_offsets of one element": (_bad_header(lambda h: _set(h, _first(h), data_offsets=[0])), "truncated or corrupt"),
    "a string entry": (_bad_header(lambda h: {**h, _first(h): "weights"}), "truncated or corrupt"),
    "a list header": (_bad_header(lambda h: [h]), "truncated or corrupt"),
    "float offsets": (_bad_header(lambda h: _set(h, _first(h), data_offsets=[float(x) for x in h[_first(h)]["data_offsets"]])),
                      "truncated or corrupt"),
    "negative offsets": (_bad_header(lambda h: _set(h, _first(h), data_offsets=[-8, h[_first(h)]["data_offsets"][1] - 8])),
                         "truncated or corrupt"),
    "overlapping offsets": (_bad_header(_overlap), "truncated or corrupt"),
    "directory named model.safetensors": (_replace("model.safetensors", lambda p: p.mkdir()), "is a directory"),
    "FIFO named model.safetensors": (_replace("model.safetensors", lambda p: os.mkfifo(p)), "not a regular file"),
    "dangling symlink": (_symlink("../blobs/0123abcd"), "broken symbolic link"),
    "symlink loop": (_symlink("model.safetensors"), "symbolic link loop"),
    "FIFO named config.json": (_replace("config.json", lambda p: os.mkfifo(p)), "not a regular file"),
    "unsafe pickle in a .bin": (_unsafe_bin, "an unsafe pickle was refused"),
    "truncated .bin": (_truncated_bin, "truncated or corrupt"),
}
SHARDED = {
    "index not JSON": (_index("{not json"), "not valid JSON"),
    "index with a list weight_map": (_index(lambda i: json.dumps({**i, "weight_map": list(i["weight_map"])})), "'weight_map'"),
    "index that is a list": (_index("[]"), "'weight_map'"),
    "index naming a file outside": (_index(lambda i: json.dumps({**i, "weight_map": {**i["weight_map"], "lm_head.weight": "../x.safetensors"}})),
                                    "outside the model directory"),
    "index naming an absolute path": (_index(lambda i: json.dumps({**i, "weight_map": {k: "/etc/passwd" for k in i["weight_map"]}})),
                                      "outside the model directory"),
    "index placing a tensor in the wrong shard": (
        _index(lambda i: json.dumps({**i, "weight_map": {**i["weight_map"], "lm_head.weight": min(i["weight_map"].values())}})),
        "does not hold it"),
}


def _run(*args: str) -> tuple[int, str, str]:
    """In a real process with a deadline, where a FIFO could make the run hang."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-m", "sparsify", *args], capture_output=True, text=True, env=env, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("case", list(SINGLE))
def test_damaged_checkpoint_is_one_line(tmp_path, dense, sparsify_cli, case):
    damage, match = SINGLE[case]
    damage(dense)
    before = snapshot(tmp_path)
    args = ("upcycle", str(dense), "--experts", "4", "-o", str(tmp_path / "out"))
    code, out, err = _run(*args) if "FIFO" in case else sparsify_cli(*args)
    line = assert_one_line_failure(code, out, err, match)
    assert "dense" in line  # names the file or directory
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", list(SHARDED))
def test_damaged_index_is_one_line(tmp_path, sharded, sparsify_cli, case):
    damage, match = SHARDED[case]
    damage(sharded)
    before = snapshot(tmp_path)
    code, out, err = sparsify_cli("upcycle", sharded, "--experts", "4", "-o", tmp_path / "out")
    line = assert_one_line_failure(code, out, err, match)
    assert "model.safetensors.index.json" in line or "sharded" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stray", ["file", "directory"])
def test_stray_safetensors_beside_the_weights_is_not_read(tmp_path, dense, demo, sparsify_cli, stray):
    """A stray `*.safetensors` (here zeros under the real tensor names) changes nothing."""
    from safetensors.torch import save_file

    import sparsify
    from sparsify.verify import compare

    if stray == "file":
        model = demo("llama")
        save_file({k: torch.zeros_like(v) for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  dense / "aaa-override.safetensors")
    else:
        (dense / "x.safetensors").mkdir()
    code, _, err = sparsify_cli("upcycle", dense, "--experts", "4", "-o", tmp_path / "out")
    assert code == 0, err
    assert compare(demo("llama"), sparsify.load(tmp_path / "out")).max_abs < 1e-5
    src = json.loads((tmp_path / "out" / "sparsify.json").read_text())["source"]
    assert sorted(src["xxh3_128"]) == ["model.safetensors"]  # provenance names the file read, only it


# ---- ONNX sources with external data ----


@pytest.fixture
def onnx_ext(tmp_path):
    import onnx

    from tests.onnx.helpers import ffn_graph

    m = onnx.load(ffn_graph(tmp_path / "plain.onnx"))
    (tmp_path / "src").mkdir()
    onnx.save_model(m, tmp_path / "src" / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return tmp_path / "src" / "m.onnx"


def test_onnx_with_external_data_under_2gb_is_upcycled(tmp_path, onnx_ext, sparsify_cli):
    import numpy as np

    from tests.onnx.helpers import run

    out = tmp_path / "moe.onnx"
    code, _, err = sparsify_cli("upcycle", onnx_ext, "--experts", "4", "--every", "1", "--target", "standard", "-o", out)
    assert code == 0, err
    x = {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(str(out), x), run(str(tmp_path / "plain.onnx"), x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.onnx", "plain.onnx", "src"]


ONNX_DAMAGE = {
    "missing external data": (lambda d: (d / "m.onnx.data").unlink(), "is missing"),
    "truncated external data": (lambda d: (d / "m.onnx.data").write_bytes((d / "m.onnx.data").read_bytes()[:100]),
                                "truncated or corrupt"),
    "external data is a directory": (lambda d: ((d / "m.onnx.data").unlink(), (d / "m.onnx.data").mkdir()), "is a directory"),
    "ONNX file is a FIFO": (lambda d: ((d / "m.onnx").unlink(), os.mkfifo(d / "m.onnx")), "not a regular file"),
}


@pytest.mark.parametrize("case", list(ONNX_DAMAGE))
def test_damaged_onnx_source_is_one_line(tmp_path, onnx_ext, sparsify_cli, case):
    damage, match = ONNX_DAMAGE[case]
    damage(onnx_ext.parent)
    before = snapshot(tmp_path)
    code, out, err = sparsify_cli("upcycle", onnx_ext, "--experts", "4", "--every", "1", "-o", tmp_path / "moe.onnx")
    line = assert_one_line_failure(code, out, err, match)
    assert "m.onnx" in line
    assert snapshot(tmp_path) == before
