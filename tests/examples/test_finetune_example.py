"""`examples/finetune_upcycled.py` runs, a short version: the loss falls, upcycling preserves the
dense model's loss exactly, and the experts, identical copies at first, drift apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "finetune_upcycled.py"


def test_short_finetune_run() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dense-steps", "20", "--steps", "40", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["loss_fell"], summary
    assert abs(summary["loss_upcycled"] - summary["loss_dense"]) < 1e-3, summary
    assert len(summary["expert_drift"]) == 4 and min(summary["expert_drift"].values()) > 0.05, summary
    # E * sum_i f_i P_i is 1 when balanced; it dips a little below when f and P anti-correlate
    assert 0.9 <= summary["balance_loss"] < 1.5, summary
    assert summary["backends"] == ["cpu"], summary
