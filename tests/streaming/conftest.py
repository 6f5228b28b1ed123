"""Upcycled demo outputs for the streaming tests, written once per session and shared.

The cases sweep every demo family in every output format that can express it, and every
recipe that changes what is stored (plain copies, Drop-Upcycling, granular experts, a shared
expert, switch routing, a capacity factor) in each format that can express it: every
(family, format) pair with plain copies, and each other recipe on families of each kind
(encoder-decoder, encoder, decoder) and in each format that takes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The gloo launcher and the worker that loads shards on each rank (spawned processes import
# them by module name, so the directory goes on the path, which spawn passes on).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "partition"))

RECIPES = {
    "copy": [],
    "drop-0.5": ["--drop-ratio", "0.5"],
    "granularity-2": ["--granularity", "2"],
    "shared-0.25": ["--shared-fraction", "0.25"],
    "router-switch": ["--router", "switch"],
    "capacity-1.0": ["--capacity-factor", "1.0"],
}

# every demo family in every format that can express it
PAIRS = [("t5", "native"), ("t5", "switch"), ("t5-gated", "native"), ("bert", "native"), ("gpt2", "native"),
         ("llama", "native"), ("llama", "mixtral"), ("mistral", "native"), ("mistral", "mixtral"),
         ("qwen2", "native"), ("qwen2", "qwen2-moe"), ("qwen3", "native"), ("qwen3", "qwen2-moe")]

# (family, format) pairs each recipe but plain copies runs on: each format that takes the recipe
# (mixtral has no shared expert, switch routing or capacity; switch no shared or granular
# experts), and encoder-decoder, encoder and decoder families
OTHER_RECIPES = {
    "drop-0.5": [("t5", "native"), ("gpt2", "native"), ("t5", "switch"), ("llama", "mixtral"), ("qwen3", "qwen2-moe")],
    "granularity-2": [("t5-gated", "native"), ("bert", "native"), ("mistral", "mixtral"), ("qwen2", "qwen2-moe")],
    "shared-0.25": [("t5", "native"), ("llama", "native"), ("qwen2", "qwen2-moe")],
    "router-switch": [("gpt2", "native"), ("qwen3", "native"), ("t5", "switch")],
    "capacity-1.0": [("bert", "native"), ("mistral", "native"), ("t5", "switch")],
}

CASES = [(f, fmt, "copy") for f, fmt in PAIRS] + [(f, fmt, r) for r, pairs in OTHER_RECIPES.items() for f, fmt in pairs]
NATIVE_CASES = [c for c in CASES if c[1] == "native"]


def case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.fixture(scope="session")
def upcycled(tmp_path_factory):
    """`upcycled(family, format, recipe)` -> the output directory of `sparsify upcycle
    demo:FAMILY -e 4 -f FORMAT RECIPE...` (written on first use, then shared)."""
    from sparsify.cli.main import main

    made: dict[tuple[str, str, str], Path] = {}
    root = tmp_path_factory.mktemp("upcycled")

    def make(family: str, fmt: str, recipe: str) -> Path:
        key = (family, fmt, recipe)
        if key not in made:
            out = root / case_id(key)
            args = ["upcycle", f"demo:{family}", "-e", "4", "-f", fmt, *RECIPES[recipe], "-o", str(out), "-q"]
            assert main(args) == 0, f"sparsify {' '.join(args)} failed"
            made[key] = out
        return made[key]

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread computes them fastest, and far faster than several
    threads on a machine whose cores are busy."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
