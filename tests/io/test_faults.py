"""Fault injection: `sparsify upcycle --force` onto a previous output on a small real disk (a
tmpfs), hit at a random moment of its write by SIGINT, SIGTERM, SIGHUP, or by another process
filling the disk. Whatever the fault and the moment: nothing is left on the disk, the previous
output is intact byte for byte, and the run says so in one line with the conventional exit code
(128 + the signal; 2 for a full disk), or, when the fault came too late, the new output is
complete (its files match the hashes in its sparsify.json).

Seeded (the same moments every run). `SPARSIFY_FAULT_RUNS` sets the number of runs (default 4,
one per kind of fault); the long run of BENCHMARKS.md is
`SPARSIFY_FAULT_RUNS=200 python -m pytest tests/io/test_faults.py -q -s` (it prints the counts).
Mounting a tmpfs needs root (or a user namespace: `unshare -rm`); without it the test is skipped.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import sparsify
from tests.io.conftest import save_llama
from tests.io.promises import assert_one_line_failure, snapshot, temporaries
from tests.io.test_crash_safety import _bytes_in_temp
from tests.io.test_disk_full import _fill, small_disk  # noqa: F401  (the fixture)

RUNS = int(os.environ.get("SPARSIFY_FAULT_RUNS", "4"))
FAULTS = ["SIGINT", "SIGTERM", "SIGHUP", "disk full"]
COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A llama whose upcycled form (16 experts, every layer) is about 50 MB: a write that lasts."""
    yield save_llama(tmp_path_factory.mktemp("faults") / "dense", 512, 128, 512)
    print(f"\nfault counts ({RUNS} runs): {dict(sorted(COUNTS.items()))}")


def _expected_bytes(dense, tmp_path) -> int:
    out = tmp_path / "dry"
    from sparsify.convert import convert

    return convert(str(dense), out, experts=16, every=1, format="native", dry_run=True).bytes_written


@pytest.mark.parametrize("run", range(RUNS))
def test_a_fault_at_a_random_moment_loses_nothing(tmp_path, small_disk, dense, run):  # noqa: F811
    rng = random.Random(run)
    fault = FAULTS[run % len(FAULTS)] if run < len(FAULTS) else rng.choice(FAULTS)
    total = _expected_bytes(dense, tmp_path)
    disk = small_disk(max(8, (2 * total >> 20) + 24))  # the previous output, the new one, a margin
    out = disk / "out"
    sparsify.save(sparsify.upcycle("demo:t5", experts=2), out)
    before = snapshot(disk)
    moment = int(rng.uniform(0.0, 1.0) * total)  # bytes of the new output written when the fault comes
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsify", "upcycle", str(dense), "--experts", "16", "--every", "1", "-o", str(out),
         "--shard-size", "8MB", "--format", "native", "--force"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    deadline = time.time() + 300
    while proc.poll() is None and (not temporaries(disk) or _bytes_in_temp(disk, "out") < moment):
        assert time.time() < deadline, "the run neither wrote nor ended"
        time.sleep(0.001)
    injected = proc.poll() is None
    if injected and fault == "disk full":
        proc.send_signal(signal.SIGSTOP)
        try:
            filler = _fill(disk)
        finally:
            proc.send_signal(signal.SIGCONT)
    elif injected:
        proc.send_signal(getattr(signal, fault))
    code = proc.wait(timeout=300)
    err = proc.stderr.read().decode()
    COUNTS["runs"] += 1
    if code == 0:  # the fault came after the swap: the new output must be whole
        COUNTS["completed before the fault"] += 1
        from sparsify.cli.main import main

        assert main(["verify", str(out)]) == 0
        assert not temporaries(disk)
        return
    COUNTS[f"faults injected: {fault}"] += 1
    assert injected, err
    expected = 2 if fault == "disk full" else 128 + getattr(signal, fault)
    assert code == expected, (code, err)
    line = assert_one_line_failure(code, "", err)
    assert "untouched" in line or "previous" in line, line
    if fault == "disk full":
        filler.unlink()
    assert temporaries(disk) == []
    assert snapshot(disk) == before, "the previous output changed"
