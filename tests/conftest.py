"""Shared fixtures: tiny real transformers models built from configs (see sparsify.io.demo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`make test` runs a worker per core) each worker, and every process its tests
# start, keeps to one thread: two workers of two threads each on two cores would only contend.
# Before torch is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
# any kernel is defined: here, before any test module is collected (some import the kernels).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEMO_NAMES = ["t5", "t5-gated", "bert", "gpt2", "llama"]


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (whole family sweeps)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def demo():
    """`demo(name)` -> a fresh seeded demo model (the same weights every call)."""
    from sparsify.io.demo import build_demo

    return build_demo


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m sparsify ARGS` in a subprocess, capturing output."""
    full_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sparsify", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )


@pytest.fixture
def cli():
    """`cli(*args, env=None)` -> CompletedProcess of the sparsify CLI."""
    return run_cli


@pytest.fixture
def sparsify_cli(capsys):
    """`sparsify_cli(*args)` -> (exit code, stdout, stderr), run in this process (fast)."""
    from sparsify.cli.main import main

    def run(*args: str):
        capsys.readouterr()  # drop what the test printed while setting up
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
