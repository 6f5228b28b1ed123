"""`benchmarks/recipes_memory.py` at its small shape, two recipes: each runs, is measured, and the
summary follows from the rows; no figure is asserted (memory at TinyLlama shapes is the long run's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "recipes_memory.py"


def test_small_run_measures_each_recipe(tmp_path):
    only = ["drop-upcycling", "fine-tunes + prompt routers"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "small", "--workdir", str(tmp_path), "--only", ",".join(only)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["recipe"] for r in rows[:-1]] == only
    assert all(r["exit"] == 0 and r["peak_rss_gb"] > 0 and r["output_gb"] > 0 for r in rows[:-1])
    summary = rows[-1]
    assert summary["summary"] and summary["all_ran"] and summary["pass"] == (summary["max_peak_rss_gb"] < 1.5)
    assert not (tmp_path / "out").exists()  # each output is removed after its measurement
