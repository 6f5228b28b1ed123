"""examples/train_expert_parallel.py trains under torchrun on CPU (gloo) and its loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_expert_parallel.py"


def test_example_trains_with_two_ranks_and_loss_falls(tmp_path):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLE), "--steps", "6", "--workdir", str(tmp_path / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, result.stdout
    assert (tmp_path / "work" / "shards" / "rank-00001-of-00002.safetensors").is_file()
