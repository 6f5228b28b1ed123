"""Conversion speed and memory against the disk, on real-size shapes (random weights).

Measures, in one run, for each case: `sparsify upcycle` as a separate process (wall time and
peak RSS via wait4), the time `dd conv=fsync` takes to write the same number of bytes, and for
the T5 case the transformers baseline (build SwitchTransformers, copy weights, save_pretrained).
Prints one JSON object per measurement.

    python benchmarks/upcycle.py [--cases t5,llama] [--workdir DIR] [--repeat N]

The sources are written first (not timed) and are warm in the page cache, as they are for the
baseline too.
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

BASELINE_T5 = r"""
import sys, torch, transformers as T
src, out, experts = sys.argv[1], sys.argv[2], int(sys.argv[3])
dense = T.T5ForConditionalGeneration.from_pretrained(src)
c = dense.config
cfg = T.SwitchTransformersConfig(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
    num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
    num_experts=experts, num_sparse_encoder_layers=c.num_layers // 2, num_sparse_decoder_layers=c.num_decoder_layers // 2)
moe = T.SwitchTransformersForConditionalGeneration(cfg)
sd = moe.state_dict()
with torch.no_grad():
    for k, v in dense.state_dict().items():
        k2 = k.replace("DenseReluDense", "mlp")
        if k2 in sd:
            sd[k2].copy_(v)
        else:  # a sparse layer: copy the dense FFN into every expert
            for e in range(experts):
                sd[k2.replace("mlp.", f"mlp.experts.expert_{e}.")].copy_(v)
moe.save_pretrained(out)
"""


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_write(path: Path, nbytes: int, direct: bool = False) -> float:
    """Seconds dd takes to write `nbytes` durably: through the page cache with a final fsync (the
    issue's baseline), or with O_DIRECT (the disk's own speed, which sparsify's writer uses)."""
    block = 16 << 20
    flag = ["oflag=direct"] if direct else []
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={-(-nbytes // block)}", "conv=fsync", *flag],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    path.unlink()
    return wall


def make_t5(path: Path) -> None:
    import torch
    import transformers as T

    cfg = T.T5Config(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_decoder_layers=12, num_heads=12,
                     vocab_size=32128, feed_forward_proj="relu", architectures=["T5ForConditionalGeneration"])
    with torch.no_grad():
        T.T5ForConditionalGeneration(cfg).save_pretrained(path)


def make_llama(path: Path) -> None:
    import torch
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                        architectures=["LlamaForCausalLM"], dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.no_grad():
        T.LlamaForCausalLM(cfg).save_pretrained(path)
    torch.set_default_dtype(torch.float32)


CASES = {
    # name: (maker, sparsify upcycle arguments, baseline)
    "t5": (make_t5, ["--experts", "32", "--every", "2"], BASELINE_T5),
    "llama": (make_llama, ["--experts", "8", "--format", "mixtral"], None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="t5,llama")
    ap.add_argument("--workdir", default=None, help="where sources and outputs go [default: a temp dir beside the repo]")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--make", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        CASES[args.make[0]][0](Path(args.make[1]))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparsify-bench-", dir=Path(__file__).resolve().parent.parent))
    work.mkdir(parents=True, exist_ok=True)
    sparsify = [sys.executable, "-m", "sparsify", "upcycle"]
    try:
        for case in args.cases.split(","):
            _, options, baseline = CASES[case]
            src = work / f"{case}-dense"
            if not src.exists():
                # Built in a child: ru_maxrss survives exec, so a parent that held a model would
                # pass its peak on to every measured child.
                subprocess.run([sys.executable, __file__, "--make", case, str(src)], check=True, capture_output=True)
            for rep in range(args.repeat):
                out = work / f"{case}-moe"
                wall, rss = _run([*sparsify, str(src), *options, "-o", str(out), "--force"])
                nbytes = _dir_bytes(out)
                shutil.rmtree(out)
                fsync = _fsync_write(work / "dd.bin", nbytes)
                direct = _fsync_write(work / "dd.bin", nbytes, direct=True)
                row = {"case": case, "tool": "sparsify", "run": rep, "wall_s": round(wall, 2), "peak_rss_gb": round(rss / 1e9, 3),
                       "output_gb": round(nbytes / 1e9, 3), "fsync_write_s": round(fsync, 2),
                       "wall_over_fsync": round(wall / fsync, 3), "direct_write_s": round(direct, 2),
                       "wall_over_direct": round(wall / direct, 3)}
                print(json.dumps(row), flush=True)
                if baseline and rep == 0:
                    out = work / f"{case}-baseline"
                    wall, rss = _run([sys.executable, "-c", baseline, str(src), str(out), "32"])
                    row = {"case": case, "tool": "transformers build-copy-save", "wall_s": round(wall, 2),
                           "peak_rss_gb": round(rss / 1e9, 3), "output_gb": round(_dir_bytes(out) / 1e9, 3)}
                    shutil.rmtree(out)
                    print(json.dumps(row), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
