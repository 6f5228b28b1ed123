"""Killing a conversion at any moment leaves no OUT or the previous complete OUT."""

import os
import signal
import subprocess
import sys
import time

import pytest

import sparsify


def _start(dense, out, *extra):
    args = [sys.executable, "-m", "sparsify", "upcycle", str(dense), "--experts", "16", "--every", "1",
            "-o", str(out), "--shard-size", "20MB", "--format", "native", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})


def _bytes_in_temp(parent, name):
    total = 0
    for entry in parent.iterdir():
        if entry.name.startswith(f".{name}.tmp-") and entry.is_dir():
            total += sum(f.stat().st_size for f in entry.iterdir())
    return total


def _kill_when(proc, parent, name, threshold, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if _bytes_in_temp(parent, name) >= threshold:
            break
        time.sleep(0.01)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert running, "the conversion ended before the kill; the test did not test anything"


def _complete(out, experts):
    model = sparsify.load(out)
    assert model.sparsify_plan.moe.num_experts == experts
    return True


@pytest.mark.parametrize("threshold", [0, 1, 30_000_000, 90_000_000])
def test_sigkill_leaves_no_partial_output(tmp_path, big_dense, threshold):
    out = tmp_path / "out"
    _kill_when(_start(big_dense, out), tmp_path, "out", threshold)
    assert not out.exists() or _complete(out, 16)
    # the next run cleans the killed run's temporary directory and completes
    proc = _start(big_dense, out, "--force")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert _complete(out, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("threshold", [1, 60_000_000])
def test_sigkill_during_force_keeps_previous_output(tmp_path, big_dense, threshold):
    out = tmp_path / "out"
    sparsify.save(sparsify.upcycle(str(big_dense), experts=2, every=1), out)
    _kill_when(_start(big_dense, out, "--force"), tmp_path, "out", threshold)
    assert out.exists()
    model = sparsify.load(out)  # complete: either the previous (2 experts) or the new (16)
    assert model.sparsify_plan.moe.num_experts in (2, 16)


def test_ctrl_c_removes_temporary_directory(tmp_path, big_dense):
    out = tmp_path / "out"
    proc = _start(big_dense, out)
    deadline = time.time() + 120
    while _bytes_in_temp(tmp_path, "out") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert "Traceback" not in proc.stderr.read().decode()
    assert list(tmp_path.iterdir()) == []
