"""ONNX upcycling builds the whole graph in memory: a job that cannot fit is refused before any of
it is built, with an estimate that covers the peak a run that fits really has. The limit is real: an address-space limit
(`ulimit -v`) set on the process that runs the CLI."""

from __future__ import annotations

import subprocess
import sys

from tests.io.promises import assert_one_line_failure

_RUN = """
import resource, sys, psutil
import torch, onnx_ir, onnx, onnxruntime, transformers  # what the command maps, before the limit is set
from sparsify.cli.main import main
vms = psutil.Process().memory_info().vms
resource.setrlimit(resource.RLIMIT_AS, (vms + (1 << 30), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def test_onnx_upcycle_refused_early_when_it_cannot_fit(tmp_path, dense_onnx):
    source = dense_onnx("gpt2")["model"]
    out = tmp_path / "moe.onnx"
    r = subprocess.run([sys.executable, "-c", _RUN, "upcycle", str(source), "--experts", "20000", "-o", str(out),
                        "--target", "standard"], capture_output=True, text=True, timeout=300)
    line = assert_one_line_failure(r.returncode, r.stdout, r.stderr, "of memory")
    assert "is available" in line and "upcycle the checkpoint instead" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries


def test_estimate_covers_the_measured_peak(tmp_path, dense_onnx):
    """The estimate is at least the peak resident growth that upcycling (and writing) really has."""
    source = dense_onnx("gpt2")["model"]
    code = f"""
import psutil, json, sys, threading, time
import onnx_ir as ir
from sparsify.onnx.upcycle import upcycle_onnx, estimate_memory
proc = psutil.Process(); base = proc.memory_info().rss; peak = [base]; stop = []
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
r = upcycle_onnx({str(source)!r}, {str(tmp_path / 'm.onnx')!r}, experts=512, every=1, target="standard")
stop.append(1); t.join()
print(json.dumps({{"growth": peak[0] - base, "estimate": estimate_memory(ir.load({str(source)!r}), r.plan, r.dense_params)[1]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["growth"] <= doc["estimate"], doc
    assert doc["estimate"] <= 4 * doc["growth"], doc  # and not so loose that it refuses what fits
