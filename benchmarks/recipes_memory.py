"""Peak memory of `sparsify upcycle` for every kind of recipe, at TinyLlama shapes (issue 14: "every
recipe streams: peak memory at TinyLlama shapes stays under 1.5 GB whatever the recipe").

The sources are those of `benchmarks/mergekit_moe.py` (a TinyLlama-shaped base, bf16, random
weights, four fine-tunes, a word-level tokenizer and per-expert prompts), made on first use under
--workdir; a calibration text for k-means routers is written beside them. Each recipe runs as its
own process (peak RSS from wait4, wall time) converting every other FFN (11 of 22), and its output
is removed before the next. Prints one JSON object per recipe and a summary line.

    python benchmarks/recipes_memory.py [--workdir DIR] [--only NAME,...] [--shape tinyllama|small]

About 7 GB of disk for one output at a time, beside the 11 GB of sources.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from commands_memory import _run  # this script's directory is on sys.path when it runs

LIMIT_GB = 1.5
HERE = Path(__file__).resolve().parent


def recipes(src: Path) -> dict[str, list[str]]:
    """Name -> upcycle flags (beside `--every 2`): one of each scheme, router and source kind."""
    finetunes = ",".join(str(src / f"finetune{i}") for i in range(4))
    return {
        "copy": ["--experts", "8"],
        "noise": ["--experts", "8", "--noise", "0.01"],
        "drop-upcycling": ["--experts", "8", "--drop-ratio", "0.5"],
        "granular G=2": ["--experts", "8", "--granularity", "2"],
        "shared expert": ["--experts", "8", "--shared-fraction", "0.25"],
        "parameter-neutral split": ["--experts", "8", "--split"],
        # expert choice routes encoders only (a decoder's experts would see later tokens): here switch
        # routing with a capacity, the other router that changes what the layer computes
        "switch with capacity 1.25": ["--experts", "8", "--router", "switch", "--capacity-factor", "1.25"],
        "router from embeddings": ["--experts", "4", "--router-init", "embeddings", "--prompts", str(src / "prompts.yaml")],
        "router from k-means": ["--experts", "8", "--router-init", "kmeans", "--calibration", str(src / "calibration.txt")],
        "experts from 4 fine-tunes": ["--experts-from", finetunes],
        "fine-tunes + averaged base": ["--experts-from", finetunes, "--merge-base", "average"],
        "fine-tunes + prompt routers": ["--experts-from", finetunes, "--router-init", "prompts", "--prompts",
                                       str(src / "prompts.yaml")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where sources and outputs go [default: a temp dir, removed after]")
    ap.add_argument("--only", default=None, help="comma-separated recipe names (default: all)")
    ap.add_argument("--shape", default="tinyllama", choices=["tinyllama", "small"])
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparsify-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / args.shape
        if not (src / "prompts.yaml").exists():
            src.mkdir(exist_ok=True)  # in a child: a parent holding a model would pass its peak on
            subprocess.run([sys.executable, str(HERE / "mergekit_moe.py"), "--make", str(src), args.shape], check=True)
        if not (src / "calibration.txt").exists():
            vocab = json.loads((src / "base" / "config.json").read_text())["vocab_size"]
            lines = (" ".join(f"w{3 + (i * 31 + k * 7) % (vocab - 3)}" for k in range(32)) for i in range(256))
            (src / "calibration.txt").write_text("\n".join(lines) + "\n")
        table = recipes(src)
        # names hold no commas, so that --only can list them
        chosen = [n.strip() for n in args.only.split(",")] if args.only else list(table)
        unknown = [n for n in chosen if n not in table]
        if unknown:
            ap.error(f"--only: unknown recipe {unknown[0]!r}; choose from {', '.join(table)}")
        peaks = {}
        for name in chosen:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "sparsify", "upcycle", str(src / "base"), *table[name], "--every", "2",
                   "-o", str(out), "-q"]
            measured = _run(cmd)  # a child's wall time and peak RSS (wait4), as commands_memory measures
            code, err = measured["exit"], measured["stderr"]
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
            fmt = json.loads((out / "sparsify.json").read_text()).get("format") if code == 0 else None
            shutil.rmtree(out, ignore_errors=True)
            row = {"recipe": name, "flags": table[name], "exit": code, "wall_s": measured["wall_s"],
                   "peak_rss_gb": measured["peak_rss_gb"], "output_gb": round(size / 1e9, 3), "format": fmt}
            if code:
                row["stderr"] = err
            print(json.dumps(row), flush=True)
            peaks[name] = row["peak_rss_gb"] if code == 0 else None
        ok = all(p is not None and p < LIMIT_GB for p in peaks.values())
        print(json.dumps({"summary": True, "shape": args.shape, "limit_gb": LIMIT_GB,
                          "max_peak_rss_gb": max((p for p in peaks.values() if p is not None), default=None),
                          "all_ran": all(p is not None for p in peaks.values()), "pass": ok}), flush=True)
        return 0 if ok else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
