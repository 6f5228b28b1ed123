"""A fast start: `--help`, `--version` and usage errors answer without importing torch and friends.

Measured robustly, not by the clock: `python -X importtime` lists every module the process
imported, and none of the heavy libraries may be among them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Each costs from 0.1 s (onnx) to 2-3 s (torch, transformers) to import.
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "safetensors", "huggingface_hub",
         "numpy", "networkx")

CASES = {
    "help": (["--help"], 0),
    "-h": (["-h"], 0),
    "bare": ([], 0),
    "version": (["--version"], 0),
    "upcycle help": (["upcycle", "--help"], 0),
    "verify -h": (["verify", "-h"], 0),
    "missing option": (["upcycle", "demo:t5"], 2),
    "missing argument": (["inspect"], 2),
    "unknown command": (["nope"], 2),
    "bad integer": (["upcycle", "demo:t5", "-e", "many", "-o", "x"], 2),
}


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparsify", *args], capture_output=True, text=True,
                       env={**os.environ}, timeout=120)
    imported = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return r, imported


@pytest.mark.parametrize("case", list(CASES))
def test_answers_without_heavy_imports(case):
    args, code = CASES[case]
    r, imported = _run(args)
    assert r.returncode == code, r.stdout + r.stderr
    assert "sparsify" in imported  # the measurement sees our own imports
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    if "help" in case or case in ("-h", "bare", "version"):
        # typer coerces given values through pydantic (0.1-0.2 s); help and version give none
        assert "pydantic" not in imported
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    if code == 0:
        assert not errors, errors
    else:
        assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in r.stderr, errors


def test_version_help_and_bare_command():
    from sparsify import __version__

    version, _ = _run(["--version"])
    assert version.stdout.strip() == f"sparsify {__version__}"
    helps = [_run(args)[0].stdout for args in (["--help"], ["-h"], [])]
    assert helps[0] == helps[1] == helps[2] and "Usage: sparsify" in helps[0] and "upcycle" in helps[0]
    assert _run(["upcycle", "-h"])[0].stdout == _run(["upcycle", "--help"])[0].stdout


def test_import_sparsify_is_light():
    code = "import sys, sparsify; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    # ... and the public names still resolve on first use
    r = subprocess.run([sys.executable, "-c", "import sparsify; print(sparsify.upcycle.__name__, sparsify.passes.FindFFN.name)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["upcycle", "find-ffn"], r.stderr
