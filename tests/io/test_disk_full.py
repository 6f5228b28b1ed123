"""A disk that is too small, or that fills up while an output is written: refused up front with
real sizes when it can be known, else one line when the disk fills; nothing left on the disk,
a previous output intact. The disks are real: small tmpfs mounts (root is needed to mount)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sparsify
from sparsify.convert import convert
from sparsify.errors import OutputError
from tests.io.promises import assert_one_line_failure, snapshot, temporaries
from tests.io.test_crash_safety import _bytes_in_temp, _start


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)` -> the path of a fresh tmpfs of that size."""
    mounts = []

    def mount(megabytes: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); these tests need root")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


_FILL = """
import errno, sys
with open(sys.argv[1], "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"\\0" * (1 << 16))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
"""


def _fill(disk: Path) -> Path:
    """Another process writes a file until the disk has no byte left; returns the file."""
    filler = disk / "filler"
    r = subprocess.run([sys.executable, "-c", _FILL, str(filler)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_tokenizer_files_count_in_the_free_space_check(tmp_path, small_disk, demo, sparsify_cli):
    """The tensors alone would fit; with the tokenizer file they do not: refused before writing."""
    dense = tmp_path / "dense"
    demo("llama").save_pretrained(dense)  # about 1.5 MB of output at 4 experts
    (dense / "tokenizer.json").write_bytes(os.urandom(3 << 20))
    disk = small_disk(4)
    before = snapshot(tmp_path)
    code, out, err = sparsify_cli("upcycle", dense, "--experts", "4", "-o", disk / "out")
    line = assert_one_line_failure(code, out, err, "not enough disk space")
    assert " MB and " in line and " MB are free" in line and "0.00 GB" not in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("previous", [False, True], ids=["new", "previous"])
def test_disk_filling_up_while_writing(tmp_path, small_disk, previous):
    """The disk fills (another writer takes the rest) once the output has begun."""
    disk = small_disk(8)
    out = disk / "out"
    if previous:
        sparsify.save(sparsify.upcycle("demo:t5", experts=2), out)
    before = snapshot(disk)
    filled: list[Path] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "write" and not filled:
            filled.append(_fill(disk))

    with pytest.raises(OutputError, match="filled up while writing") as err:
        convert("demo:llama", out, experts=4, force=previous, progress=progress)
    assert filled, "the disk was never filled; the test did not test anything"
    message = str(err.value)
    assert "\n" not in message and ("the previous" in message) == previous
    filled[0].unlink()
    assert temporaries(disk) == []
    assert snapshot(disk) == before


def test_disk_filled_by_another_process_during_a_cli_run(tmp_path, small_disk, big_dense):
    """`sparsify upcycle` as a process; once it writes, it is paused, another process fills the
    disk, and it goes on: one line, nothing left, the previous output intact."""
    disk = small_disk(240)  # room for the ~150 MB output, but not once filled
    out = disk / "out"
    sparsify.save(sparsify.upcycle("demo:t5", experts=2), out)
    before = snapshot(disk)
    proc = _start(big_dense, out, "--force")
    deadline = time.time() + 120
    while _bytes_in_temp(disk, "out") == 0:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the disk was filled"
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    try:
        _fill(disk)
    finally:
        proc.send_signal(signal.SIGCONT)
    code = proc.wait(timeout=300)
    err = proc.stderr.read().decode()
    line = assert_one_line_failure(code, "", err, "filled up while writing")
    assert "the previous" in line and "untouched" in line
    (disk / "filler").unlink()
    assert temporaries(disk) == []
    assert snapshot(disk) == before
