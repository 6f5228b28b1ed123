"""How fast the command line answers when it has no model to load.

Times, in one run, `sparsify --help`, `--version`, `upcycle --help` and a usage error, each as
a fresh process (the console script's own interpreter), against two baselines measured the same
way: an interpreter that does nothing (`python -c pass`, the floor) and one that imports torch
(what every answer cost before imports were deferred). Prints one JSON object per measurement:
best and median wall seconds over --repeat runs, and the exit code.

    python benchmarks/cli_start.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "python -c 'import torch' (before)": [sys.executable, "-c", "import torch"],
    "sparsify --help": [sys.executable, "-m", "sparsify", "--help"],
    "sparsify --version": [sys.executable, "-m", "sparsify", "--version"],
    "sparsify upcycle --help": [sys.executable, "-m", "sparsify", "upcycle", "--help"],
    "sparsify upcycle (missing --experts)": [sys.executable, "-m", "sparsify", "upcycle", "demo:t5"],
}


def measure(cmd: list[str], repeat: int) -> dict:
    walls, code = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        walls.append(time.perf_counter() - t0)
    return {"best_s": round(min(walls), 4), "median_s": round(statistics.median(walls), 4), "exit_code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    for name, cmd in CASES.items():
        measure(cmd, 1)  # warm the page cache and the bytecode caches
        print(json.dumps({"benchmark": "cli_start", "case": name, "repeat": args.repeat, **measure(cmd, args.repeat)}),
              flush=True)


if __name__ == "__main__":
    main()
