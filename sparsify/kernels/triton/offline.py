"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and read what the
compiler made of them.

Each kernel is compiled as a launch on that GPU would compile it (Triton's own argument
specialisation, through a stand-in driver that only names the target), for every block
configuration the tuner would try at a shape, and the machine code is read with the CUDA tools
that come with Triton (cuobjdump): shared memory per program and whether it fits the GPU,
registers, spills (stack bytes, local loads and stores) and the tensor-core instructions used
(HGMMA: Hopper's warpgroup MMA; HMMA: the older per-warp one). Nothing runs: this finds kernels
that do not compile for the GPU (the interpreter accepts more), tiles that cannot fit, and spills,
at no GPU time. How fast a candidate runs still needs the GPU.

Under TRITON_INTERPRET=1 the kernels are interpreter objects, so this runs in a process of its own:

    python -m sparsify.kernels.triton.offline [--tokens 4096 --hidden 4096 --ffn 14336 --experts 8
        --top-k 2 --dtype bfloat16 --activation silu --backward --first --arch 90]

prints one JSON line per compiled kernel and configuration (exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import torch

__all__ = ["report", "SHARED_LIMIT"]

# Shared memory one program may use (the opt-in maximum), bytes, by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


class _StandIn:
    """A Triton driver that names the target GPU and nothing more: enough to compile
    (`kernel.warmup`), not to launch."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class _Compiling:
    """Stands in `ops` for a kernel: `kernel[grid](*args)` compiles it for the target (unless not
    `wanted`), launches nothing, and hands the compiled kernel to `sink`."""

    def __init__(self, kernel, sink: Callable, wanted: bool = True) -> None:
        self.kernel, self.sink, self.wanted = kernel, sink, wanted

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            if self.wanted:
                self.sink(self.kernel.fn.__name__, self.kernel.warmup(*args, grid=grid, **kwargs))

        return launch


def _machine_code(kernel) -> dict:
    """Registers, spills and matrix instructions of a compiled kernel, read from its cubin."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    return {
        "registers": int(re.search(r"REG:(\d+)", usage)[1]),
        "stack": int(re.search(r"STACK:(\d+)", usage)[1]),
        "local_ops": sum(op.startswith(("LDL", "STL")) for op in ops),
        "hgmma": sum(op.startswith("HGMMA") for op in ops),
        "hmma": sum(op.startswith("HMMA") for op in ops),
    }


def report(tokens: int = 4096, hidden: int = 4096, ffn: int = 14336, experts: int = 8, top_k: int = 2,
           dtype: torch.dtype = torch.bfloat16, activation: str = "silu", gated: bool = True, backward: bool = False,
           arch: int = 90, multiprocessors: int = 132, first: bool = False,
           kernels: tuple[str, ...] = ("up", "down", "wgrad")) -> list[dict]:
    """Compile the kernels of one MoE layer's forward (and backward) for GPU `arch`, for every
    configuration the tuner would try there (`first`: only the one it would try first; `kernels`:
    only these); one dict per kernel and configuration, with `shared_estimate`, the launcher's
    estimate by which the tuner passes over tiles that cannot fit."""
    import triton
    from triton.runtime.driver import driver

    from ..reference import sorted_offsets
    from . import ops, tuning

    if tuning.interpreting():
        raise RuntimeError("compiling for a GPU needs TRITON_INTERPRET unset; run this in a process of its own")
    rows: list[dict] = []
    state: dict = {"cfg": None}

    def sink(name: str, kernel) -> None:
        if state["cfg"] is None:  # the chosen configuration launched again after the search
            return
        shared = kernel.metadata.shared
        rows.append({"kernel": name, "pass": state["pass"], "key": [str(k) for k in state["key"]],
                     "cfg": state["cfg"]._asdict(), "shared": shared, "fits": shared <= SHARED_LIMIT.get(arch, 49152),
                     "shared_estimate": state["estimate"],
                     **_machine_code(kernel), "error": None})

    def every(kind, key, bucket, run, split_ok=True, desc_ok=True, rows_desc_ok=True, room=None):
        # every candidate, also those the launcher's estimate says cannot fit: the report checks it
        cfgs = tuning.candidates(kind, bucket, split_ok, desc_ok, rows_desc_ok)
        if kind not in kernels:
            state["cfg"] = None
            return cfgs[0]
        compiled = []
        for cfg in cfgs[:1] if first else cfgs:
            state.update(cfg=cfg, key=key, estimate=room.bytes(cfg))
            try:
                run(cfg)
                compiled.append(cfg)
            except Exception as err:  # noqa: BLE001 - reported, as the tuner would skip it
                rows.append({"kernel": f"{kind}_kernel", "pass": state["pass"], "key": [str(k) for k in key],
                             "cfg": cfg._asdict(), "error": f"{type(err).__name__}: {str(err)[:300]}"})
        state["cfg"] = None
        if not compiled:
            raise RuntimeError(f"no configuration of {kind} compiles for sm_{arch}: {rows[-1]['error']}")
        return compiled[0]

    saved = {name: getattr(ops, name) for name in ("pick", "up_kernel", "down_kernel", "wgrad_kernel",
                                                    "_multiprocessors", "_shared_limit")}
    previous = getattr(driver, "_active", None)  # None until a launch asks for one (none on a CPU machine)
    driver.set_active(_StandIn(arch))
    try:
        ops.pick = every
        for name in ("up_kernel", "down_kernel", "wgrad_kernel"):
            setattr(ops, name, _Compiling(saved[name], sink, name.removesuffix("_kernel") in kernels))
        ops._multiprocessors = lambda device: multiprocessors
        ops._shared_limit = lambda device: None
        x = torch.empty(tokens, hidden, dtype=dtype)
        w1, w2 = torch.empty(experts, ffn, hidden, dtype=dtype), torch.empty(experts, hidden, ffn, dtype=dtype)
        w3 = torch.empty(experts, ffn, hidden, dtype=dtype) if gated else None
        tok = torch.arange(tokens).repeat(top_k)
        scale = torch.rand(tokens * top_k, dtype=dtype)
        order, offsets = sorted_offsets(torch.arange(tokens * top_k) % experts, experts)
        tok, scale = tok[order], scale[order]
        state["pass"] = "forward"
        _, h, pre, gate, y = ops._forward_impl(x, tok, scale, offsets, w1, w2, w3, None, None, None, None, activation,
                                               True, backward, backward)
        if backward:
            state["pass"] = "backward"
            ops._backward(torch.empty_like(x), x, tok, scale, offsets, w1, w2, w3, None, h, pre, gate, y, activation,
                          [False, False, False])
    finally:
        for name, value in saved.items():
            setattr(ops, name, value)
        driver.set_active(previous)
    for row in rows:
        row["triton"] = triton.__version__
        row["arch"] = arch
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsify.kernels.triton.offline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--activation", default="silu", help="an activation, a comma-separated list, or 'all'")
    parser.add_argument("--dense", action="store_true", help="an FFN without a gate (default: gated, SwiGLU-style)")
    parser.add_argument("--backward", action="store_true", help="the backward kernels too")
    parser.add_argument("--first", action="store_true", help="only the configuration the tuner tries first")
    parser.add_argument("--kernels", default="up,down,wgrad", help="which kernels to compile (comma-separated)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--multiprocessors", type=int, default=132, help="for persistent programs (132: H100 SXM)")
    args = parser.parse_args(argv)
    from .activations import ACT_CODES

    names = list(ACT_CODES) if args.activation == "all" else args.activation.split(",")
    unknown = [n for n in names if n not in ACT_CODES]
    if unknown:
        parser.error(f"unknown activation {unknown[0]!r}; choose from {', '.join(ACT_CODES)} or 'all'")
    failed = 0
    for name in names:
        rows = report(args.tokens, args.hidden, args.ffn, args.experts, args.top_k, getattr(torch, args.dtype), name,
                      not args.dense, args.backward, args.arch, args.multiprocessors, args.first,
                      tuple(args.kernels.split(",")))
        for row in rows:
            row["activation"] = name
            print(json.dumps(row))
            failed += row["error"] is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
