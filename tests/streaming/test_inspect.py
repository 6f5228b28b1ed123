"""`sparsify inspect` on an upcycled output reads its configs, plan and tensor headers only."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from .conftest import PAIRS, case_id


def _read_bytes() -> int:
    """Bytes this process has read through read/pread so far (Linux's rchar)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")).split()[1])


def _scramble(out: Path) -> int:
    """Overwrite every tensor byte of every safetensors file of `out` with random bytes (headers
    kept, so sizes stay right); returns the bytes overwritten."""
    total = 0
    for f in out.glob("*.safetensors"):
        with open(f, "r+b") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            size = f.stat().st_size - 8 - n
            fh.seek(8 + n)
            fh.write(os.urandom(size))
            total += size
    return total


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads with Linux's /proc/self/io")
@pytest.mark.parametrize("case", [(f, fmt, "copy") for f, fmt in PAIRS], ids=case_id)
def test_inspect_reads_no_weights(upcycled, case, tmp_path, sparsify_cli):
    original = upcycled(*case)
    out = tmp_path / "out"
    shutil.copytree(original, out)
    data = _scramble(out)
    code, want, _ = sparsify_cli("inspect", original, "--json")
    assert code == 0
    before = _read_bytes()
    code, got, err = sparsify_cli("inspect", out, "--json")
    read = _read_bytes() - before
    assert code == 0, err
    doc, ref = json.loads(got), json.loads(want)
    assert doc.pop("path") == str(out) and ref.pop("path") == str(original)
    assert doc == ref and doc["kind"] == "upcycled"  # garbage weights: the same report
    assert read < data / 10, f"inspect read {read} bytes of an output with {data} bytes of weights"
