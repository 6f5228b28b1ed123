"""The Triton kernels compile for a Hopper GPU (sm_90), checked on this CPU machine.

`python -m sparsify.kernels.triton.offline` compiles them as a launch on an H100 would (Triton's
own specialisation of the arguments) and reads the machine code back. Triton's CPU interpreter
accepts code the GPU compiler rejects (it did: module-level constants in the activations), so
this is where CI finds out that the GPU build no longer compiles, or that a tuning candidate
can never run on an H100 (more shared memory than a program may have).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsify.kernels.triton.offline import SHARED_LIMIT

from .cases import FAST_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not installed")


def _offline(*args: str) -> list[dict]:
    # Under TRITON_INTERPRET=1 the kernels are interpreter objects: compile in a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparsify.kernels.triton.offline", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


H100_SHARED = SHARED_LIMIT[90]  # bytes one program may use on an H100 (227 KB)
SMALL = ["--tokens", "32", "--hidden", "64", "--ffn", "128", "--experts", "4", "--first", "--backward"]


@pytest.mark.parametrize("form", ["gated", "dense", "float32", "float16"])
def test_every_kernel_compiles_for_sm90(form: str) -> None:
    """Forward and backward kernels: every activation (gated FFN), dense FFNs, every dtype."""
    from sparsify.kernels.triton.activations import ACT_CODES

    extra = {"gated": ["--activation", "all"], "dense": ["--activation", "relu,gelu_tanh", "--dense"],
             "float32": ["--dtype", "float32", "--activation", "silu,gelu"],
             "float16": ["--dtype", "float16", "--activation", "relu", "--dense"]}[form]
    rows = _offline(*SMALL, *extra)
    assert rows and not [r for r in rows if r["error"]]
    activations = list(ACT_CODES) if "all" in extra else extra[extra.index("--activation") + 1].split(",")
    for act in activations:
        compiled = {(r["kernel"], r["pass"]) for r in rows if r["activation"] == act}
        assert {("up_kernel", "forward"), ("down_kernel", "forward"), ("up_kernel", "backward"),
                ("down_kernel", "backward"), ("wgrad_kernel", "backward")} <= compiled, (act, compiled)


def test_prefill_candidates_fit_an_h100_and_use_wgmma() -> None:
    """Every configuration the tuner tries for a Mixtral-8x7B layer at prefill size compiles, fits
    an H100's shared memory and multiplies with Hopper's warpgroup MMA (HGMMA)."""
    rows = _offline("--tokens", "4096")  # bfloat16, hidden 4096, ffn 14336, 8 experts, top-2, SwiGLU
    assert {r["kernel"] for r in rows} == {"up_kernel", "down_kernel"}
    for r in rows:
        assert r["error"] is None, r
        assert r["fits"], f"{r['kernel']} {r['cfg']} needs {r['shared']} bytes of shared memory"
        assert r["shared_estimate"] <= H100_SHARED, r  # the launcher's estimate does not rule it out
        assert r["hgmma"] > 0 and r["hmma"] == 0, r


def test_tuner_passes_over_only_tiles_that_cannot_fit() -> None:
    """The launcher estimates each tile's shared memory so that the tuner does not compile tiles
    that would fail at launch. The backward's second kernel reads two row and two weight tiles per
    step, so its tallest tiles cannot fit an H100: every tile the estimate rules out is one the
    compiler could not fit, and every other compiles."""
    rows = _offline("--tokens", "4096", "--backward", "--kernels", "down")
    ruled_out = [r for r in rows if r["shared_estimate"] > H100_SHARED]
    assert ruled_out, "no tile ruled out: the check checks nothing"
    for r in rows:
        assert r["error"] is None, r
        if r["shared_estimate"] > H100_SHARED:
            assert not r["fits"], f"{r['cfg']} fits ({r['shared']} B), yet estimated {r['shared_estimate']} B"
