"""Wall time and peak memory of inspect, shard, verify and profile on a large upcycled output.

Builds a t5-base-shaped dense checkpoint (random weights: d_model 768, d_ff 3072, 12+12 layers,
vocab 32128), upcycles it to 32 experts every other layer in the native format (about 7.9 GB),
then runs each command in its own process and records its wall time and peak RSS (ru_maxrss
from wait4), beside the baselines measured in the same run: an fsync'd `dd` of as many bytes
as `shard` writes, and the dense model's size and the peak RSS of loading it (as verify does).
Prints one JSON object per measurement and a summary with the acceptance targets (issue 13):

    inspect                  under 3 s and under 1 GB
    shard                    at most 1.5x the fsync'd dd, under 1.5 GB
    verify, profile          peak at most the dense model's size + 1.5 GB

    python benchmarks/commands_memory.py [--workdir DIR] [--quick | --shape medium] [--keep]

The full shape needs about 17 GB free under --workdir (the dense model, the output, the shards;
the dd file is written once the shards are gone). `--quick` runs a small shape (under a minute)
that checks the benchmark itself; its figures say nothing about the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
MARGIN = 1.5 * GB  # memory allowed above the dense model (verify, profile) or in all (shard)

SHAPES = {
    # name: T5 config, experts
    "t5-base": (dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=32128), 32),
    # memory per MoE layer (268 MB) well above the dense model (about 60 MB): what a command holds shows
    "medium": (dict(d_model=512, d_ff=2048, d_kv=64, num_layers=4, num_decoder_layers=4, num_heads=8, vocab_size=1000), 32),
    "quick": (dict(d_model=64, d_ff=256, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=1000), 32),
}

# Loads the dense model as `sparsify verify` does (the baseline of verify's and profile's memory),
# then touches every weight: transformers maps the checkpoint, and pages count once they are read.
LOAD_DENSE = ("import sys; from sparsify.cli.common import load_any; m, _ = load_any(sys.argv[1]); "
              "[float(p.sum()) for p in m.parameters()]")


def make_dense(path: Path, shape: str) -> None:
    """A T5 of `shape` with random weights, saved with save_pretrained (safetensors)."""
    import torch
    import transformers as T

    config, _ = SHAPES[shape]
    cfg = T.T5Config(**config, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                     architectures=["T5ForConditionalGeneration"])
    with torch.no_grad():
        T.T5ForConditionalGeneration(cfg).save_pretrained(path)


def _run(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS and exit status of a child process. The parent holds no model
    (ru_maxrss survives exec, so a child would inherit a big parent's peak)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
            "exit": os.waitstatus_to_exitcode(status), "stderr": err.strip()[-2000:]}


def _checked(cmd: list[str], ok: tuple[int, ...] = (0,)) -> dict:
    row = _run(cmd)
    if row["exit"] not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {row['exit']}: {row['stderr']}")
    return row


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _dd(path: Path, nbytes: int) -> float:
    """Seconds an fsync'd dd takes to write `nbytes` through the page cache."""
    block = 16 << 20
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={-(-nbytes // block)}", "conv=fsync"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    path.unlink()
    return wall


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _dry_run_bytes(sparsify: list[str], dense: Path, upcycle: list[str], work: Path) -> int:
    out = subprocess.run([*sparsify, "upcycle", str(dense), *upcycle, "-o", str(work / "dry-run"), "--dry-run", "--json"],
                         check=True, capture_output=True, text=True)
    return int(json.loads(out.stdout)["weight_bytes"])


def run(work: Path, shape: str) -> bool:
    """Measure every command at `shape` under `work`; True when every target is met."""
    config, experts = SHAPES[shape]
    py = sys.executable
    sparsify = [py, "-m", "sparsify"]
    dense, out, shards = work / "dense", work / "moe", work / "shards"
    plan, stats = work / "plan.json", work / "stats.json"
    upcycle = ["--experts", str(experts), "--every", "2", "--format", "native"]
    if not dense.exists():  # built in a child, for the reason _run gives
        subprocess.run([py, __file__, "--make", shape, str(dense)], check=True, capture_output=True)
    dense_bytes = _weights_bytes(dense)
    moe_bytes = _dry_run_bytes(sparsify, dense, upcycle, work)
    need = 2 * moe_bytes + (64 << 20)  # the output and the shards, the dense model being there already
    for old in (out, shards):  # written again below (kept by --keep): their room counts as free
        shutil.rmtree(old, ignore_errors=True)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work} has {free / GB:.1f} GB free; this shape needs {need / GB:.1f} GB (pass --workdir)")
    _emit({"benchmark": "commands_memory", "shape": shape, "config": config, "experts": experts, "every": 2,
           "dense_gb": round(dense_bytes / GB, 3), "output_gb": round(moe_bytes / GB, 3), "cpus": os.cpu_count()})

    row = _checked([*sparsify, "upcycle", str(dense), *upcycle, "-o", str(out), "--force", "-q"])
    _emit({"command": "upcycle", **_public(row), "output_gb": round(_dir_bytes(out) / GB, 3)})
    _checked([*sparsify, "partition", str(out), "-n", "4", "-o", str(plan), "--force", "-q"])

    load = _checked([py, "-c", LOAD_DENSE, str(dense)])
    _emit({"baseline": "load dense model", **_public(load), "dense_gb": round(dense_bytes / GB, 3)})
    bound = dense_bytes + MARGIN

    results: dict[str, bool] = {}
    row = _checked([*sparsify, "inspect", str(out), "-q"])
    results["inspect"] = row["wall_s"] < 3 and row["peak_rss_gb"] * GB < 1 * GB
    _emit({"command": "inspect", **_public(row), "target": "under 3 s and under 1 GB", "pass": results["inspect"]})

    row = _checked([*sparsify, "shard", str(out), "--plan", str(plan), "-o", str(shards), "--force", "-q"])
    written = _dir_bytes(shards)
    shutil.rmtree(shards)  # room for the dd file
    dd = _dd(work / "dd.bin", written)
    _emit({"baseline": "dd conv=fsync", "wall_s": round(dd, 2), "bytes_gb": round(written / GB, 3)})
    results["shard"] = row["wall_s"] <= 1.5 * dd and row["peak_rss_gb"] * GB < MARGIN
    _emit({"command": "shard", **_public(row), "written_gb": round(written / GB, 3), "wall_over_dd": round(row["wall_s"] / dd, 3),
           "target": "at most 1.5x dd and under 1.5 GB", "pass": results["shard"]})

    row = _checked([*sparsify, "verify", str(dense), str(out), "-q"], ok=(0, 1))  # 1: a mismatch, reported
    results["verify"] = row["peak_rss_gb"] * GB <= bound
    _emit({"command": "verify", **_public(row), "match": row["exit"] == 0, "limit_gb": round(bound / GB, 3),
           "target": "peak at most the dense model's size + 1.5 GB", "pass": results["verify"]})

    row = _checked([*sparsify, "profile", str(out), "--demo-text", "-o", str(stats), "--force", "-q"])
    results["profile"] = row["peak_rss_gb"] * GB <= bound
    _emit({"command": "profile", **_public(row), "limit_gb": round(bound / GB, 3),
           "target": "peak at most the dense model's size + 1.5 GB", "pass": results["profile"]})

    _emit({"summary": True, "shape": shape, "pass": results, "all_pass": all(results.values()),
           "targets_apply": shape == "t5-base"})
    return all(results.values())


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("stderr", "exit")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where the models go [default: a temp dir under /tmp, removed after]")
    ap.add_argument("--quick", action="store_true", help="a small shape, to check the benchmark (under a minute)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="t5-base", help="the model's shape [default: t5-base]")
    ap.add_argument("--keep", action="store_true", help="keep the workdir's models (reused by the next run)")
    ap.add_argument("--make", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make:
        make_dense(Path(args.make[1]), args.make[0])
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sparsify-commands-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, "quick" if args.quick else args.shape)
    finally:
        if not args.keep:
            for name in ("dense", "moe", "shards", "plan.json", "stats.json", "dd.bin"):
                p = work / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
