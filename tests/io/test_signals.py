"""SIGINT, SIGTERM and SIGHUP, sent to a real `sparsify upcycle` process while it writes or before
it does: exit 128 + the signal, one line saying that nothing was written (and that the previous
OUT is untouched), no temporaries left, the previous OUT byte for byte as it was."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import sparsify
from tests.io.promises import assert_one_line_failure, snapshot, temporaries
from tests.io.test_crash_safety import _bytes_in_temp, _start

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _wait_for(condition, proc, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the signal; the test did not test anything"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.005)


def _catches(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.fixture
def previous_out(tmp_path):
    out = tmp_path / "out"
    sparsify.save(sparsify.upcycle("demo:t5", experts=2), out)
    return out


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("previous", [False, True], ids=["new", "previous"])
def test_signal_while_writing(tmp_path, big_dense, request, sig, previous):
    out = tmp_path / "out"
    before = snapshot(request.getfixturevalue("previous_out")) if previous else None
    proc = _start(big_dense, out, *(["--force"] if previous else []))
    _wait_for(lambda: _bytes_in_temp(tmp_path, "out") > 0, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 128 + sig, err
    name = signal.Signals(sig).name
    line = assert_one_line_failure(code, "", err, f"interrupted by {name}; nothing was written")
    assert ("previous" in line and "untouched" in line) if previous else "not created" in line, line
    assert temporaries(tmp_path) == []
    if previous:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if previous else [])


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_before_writing(tmp_path, big_dense, sig):
    out = tmp_path / "out"
    proc = _start(big_dense, out)
    _wait_for(lambda: _catches(proc.pid, signal.SIGHUP), proc)  # the CLI's handlers are installed
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 128 + sig, err
    line = assert_one_line_failure(code, "", err, f"interrupted by {signal.Signals(sig).name}; nothing was written")
    assert list(tmp_path.iterdir()) == []
