"""`benchmarks/commands_memory.py --quick`: every command runs, is measured, and the summary
holds the targets; no figure is asserted (timings mean nothing on a shared machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "commands_memory.py"


def test_quick_run_measures_every_command(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    head, summary = rows[0], rows[-1]
    assert head["benchmark"] == "commands_memory" and head["shape"] == "quick" and head["experts"] == 32
    commands = {r["command"]: r for r in rows if "command" in r}
    baselines = {r["baseline"]: r for r in rows if "baseline" in r}
    assert set(commands) == {"upcycle", "inspect", "shard", "verify", "profile"}
    assert set(baselines) == {"load dense model", "dd conv=fsync"}
    for row in [*commands.values(), *baselines.values()]:
        assert row["wall_s"] > 0 and row.get("peak_rss_gb", 1) > 0
    assert commands["verify"]["match"] is True
    # the dd baseline writes as many bytes as the shards hold, which are the output's weights and more
    assert baselines["dd conv=fsync"]["bytes_gb"] == commands["shard"]["written_gb"] >= head["output_gb"] > head["dense_gb"] > 0
    assert abs(commands["verify"]["limit_gb"] - head["dense_gb"] - 1.5) < 2e-3
    assert summary["summary"] and set(summary["pass"]) == {"inspect", "shard", "verify", "profile"}
    assert summary["all_pass"] == all(summary["pass"].values()) and summary["targets_apply"] is False
    assert all(commands[c]["pass"] == summary["pass"][c] for c in summary["pass"])
    assert list(tmp_path.iterdir()) == []  # the models are removed without --keep
