"""sparsify against mergekit-moe on the same sources, in one run: four fine-tunes of one base
(TinyLlama shapes, bf16, random weights) merged into a 4-expert Mixtral, with random gates and
with prompt gates (mergekit's "hidden", sparsify's `--router-init prompts`).

    python benchmarks/mergekit_moe.py [--shape tinyllama|small] [--workdir DIR] [--venv DIR] [--repeat N]

Measures wall time and peak RSS (wait4) of each tool as a separate process, then compares the
two outputs tensor by tensor: every expert tensor and every other tensor but the routers (the
two tools compute gates differently) must be equal. Prints one JSON object per measurement and
a summary line.

mergekit is installed from PyPI into its own virtual environment (`--venv`, default under the
work directory), which sees this interpreter's packages through a .pth file, as
`--system-site-packages` would for a system Python: mergekit then shares torch (the CPU build)
and transformers with sparsify instead of pulling a CUDA build of torch.

The sources are written first by a child process (not timed) and read once more (not timed)
before each tool's run, so that both start with them warm in the page cache; the fine-tunes are the base plus small seeded noise on every tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

MERGEKIT = "mergekit==0.1.5"
EXPERTS = 4
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4000, max_position_embeddings=512),
}


def _prompts(vocab: int) -> list[dict]:
    """Per expert, positive prompts of words from its own quarter of the vocabulary."""
    quarter = (vocab - 3) // EXPERTS
    out = []
    for e in range(EXPERTS):
        low = 3 + e * quarter
        out.append({"positive": [" ".join(f"w{low + (s * 7 + k * 13) % quarter}" for k in range(24)) for s in range(6)]})
    return out


def make_sources(work: Path, shape: str) -> None:
    """Base, four fine-tunes, a word-level tokenizer (word `w{i}` is token i) and prompt files."""
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = SHAPES[shape]
    special = {"<s>": 0, "</s>": 1, "<unk>": 2}
    inner = Tokenizer(models.WordLevel({**special, **{f"w{i}": i for i in range(3, cfg["vocab_size"])}}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    config = transformers.LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], dtype="bfloat16", bos_token_id=0,
                                      eos_token_id=1)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.no_grad():
        transformers.LlamaForCausalLM(config).save_pretrained(work / "base", max_shard_size="500MB")
    torch.set_default_dtype(torch.float32)
    tokenizer.save_pretrained(work / "base")
    for i in range(EXPERTS):
        tuned = work / f"finetune{i}"
        shutil.copytree(work / "base", tuned, ignore=shutil.ignore_patterns("*.safetensors"))
        for shard in sorted((work / "base").glob("*.safetensors")):
            tensors = {}
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    g = torch.Generator().manual_seed(zlib.crc32(f"{i}:{name}".encode()))
                    tensors[name] = (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(t.dtype)
            save_file(tensors, tuned / shard.name, metadata={"format": "pt"})
            del tensors
    import yaml

    prompts = _prompts(cfg["vocab_size"])
    (work / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    for gates in ("random", "hidden"):
        experts = [{"source_model": str(work / f"finetune{i}"),
                    **({"positive_prompts": prompts[i]["positive"]} if gates == "hidden" else {})} for i in range(EXPERTS)]
        config = {"base_model": str(work / "base"), "gate_mode": gates, "dtype": "bfloat16", "experts_per_token": 2,
                  "experts": experts}
        (work / f"mergekit-{gates}.yaml").write_text(yaml.safe_dump(config))


def ensure_mergekit(venv: Path) -> Path:
    """The mergekit-moe executable of `venv`, created and installed on first use."""
    exe = venv / "bin" / "mergekit-moe"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", MERGEKIT], check=True)
    return exe


def _run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def _warm(sources: Path) -> None:
    """Read every source file once (not timed), so that each tool starts with its sources in the
    page cache: 11 GB of sources and two outputs of 6.8 GB do not all fit in 24 GB, and whichever
    tool ran after a write would otherwise read from the disk."""
    buf = bytearray(16 << 20)
    for f in sorted(sources.rglob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _tensors(path: Path):
    """(key, read) for every tensor of a Mixtral output but the routers. Experts are keyed
    (layer, expert, role) whether written one tensor per expert and projection (the hub layout
    of Mixtral-8x7B, which sparsify writes) or stacked as transformers 5 holds them in memory
    (`mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], which mergekit 0.1.5 writes)."""
    import re

    from safetensors import safe_open

    listing = path / "model.safetensors.index.json"
    if listing.exists():
        files = {name: path / f for name, f in json.loads(listing.read_text())["weight_map"].items()}
    else:  # a single shard has no index
        files = {}
        for f in path.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                files.update({name: f for name in fh.keys()})

    def read(name: str):
        with safe_open(files[name], "pt") as fh:
            return fh.get_tensor(name)

    for name in sorted(files):
        if re.fullmatch(r"model\.layers\.\d+\.(block_sparse_moe|mlp)\.gate\.weight", name):
            continue
        per_expert = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", name)
        stacked = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if per_expert:
            layer, e, role = per_expert.groups()
            yield (int(layer), int(e), role), lambda n=name: read(n)
        elif stacked:
            layer, kind = stacked.groups()
            experts = read(name)
            for e in range(experts.shape[0]):
                if kind == "down_proj":
                    yield (int(layer), e, "w2"), lambda t=experts[e]: t
                else:
                    gate, up = experts[e].chunk(2, dim=0)
                    yield (int(layer), e, "w1"), lambda t=gate: t
                    yield (int(layer), e, "w3"), lambda t=up: t
        else:
            yield name, lambda n=name: read(n)


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two Mixtral outputs, routers left out."""
    import torch

    theirs = dict(_tensors(b))
    different, experts, count = [], 0, 0
    ours = set()
    for key, read in _tensors(a):
        ours.add(key)
        if key not in theirs:
            continue
        count += 1
        experts += isinstance(key, tuple)
        if not torch.equal(read(), theirs[key]()):
            different.append(str(key))
    missing = sorted(str(k) for k in ours ^ set(theirs))
    return {"tensors_compared": count, "expert_tensors": experts, "different": different[:5],
            "not_in_both": missing[:5], "equal": not different and not missing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--workdir", default=None, help="where sources and outputs go [default: a temp dir beside the repo]")
    ap.add_argument("--venv", default=None, help="mergekit's virtual environment [default: WORKDIR/mergekit-venv]")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--make", nargs=2, metavar=("DIR", "SHAPE"), help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_sources(Path(args.make[0]), args.make[1])
        return
    if args.compare:
        print(json.dumps(compare(Path(args.compare[0]), Path(args.compare[1]))))
        return
    root = Path(__file__).resolve().parent.parent
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparsify-bench-", dir=root))
    work.mkdir(parents=True, exist_ok=True)
    try:
        mergekit = ensure_mergekit(Path(args.venv) if args.venv else work / "mergekit-venv")
        sources = work / args.shape
        if not (sources / "prompts.yaml").exists():
            sources.mkdir(exist_ok=True)
            # in a child: ru_maxrss survives exec, so a parent that held a model would pass its peak on
            subprocess.run([sys.executable, __file__, "--make", str(sources), args.shape], check=True)
        finetunes = ",".join(str(sources / f"finetune{i}") for i in range(EXPERTS))
        gate_flags = {"random": [], "hidden": ["--router-init", "prompts", "--prompts", str(sources / "prompts.yaml")]}
        summary = {}
        for gates, flags in gate_flags.items():
            for rep in range(args.repeat):
                ours, theirs = work / f"sparsify-{gates}", work / f"mergekit-{gates}"
                for out in (ours, theirs):
                    shutil.rmtree(out, ignore_errors=True)
                runs = {
                    "sparsify": [sys.executable, "-m", "sparsify", "upcycle", str(sources / "base"), "--experts-from",
                                 finetunes, "--format", "mixtral", "-o", str(ours), *flags],
                    "mergekit-moe": [str(mergekit), str(sources / f"mergekit-{gates}.yaml"), str(theirs)],
                }
                measured = {}
                for tool, cmd in runs.items():
                    _warm(sources)  # the other tool's output may have pushed the sources out of the cache
                    wall, rss = _run(cmd)
                    measured[tool] = (wall, rss)
                    print(json.dumps({"shape": args.shape, "gates": gates, "tool": tool, "run": rep, "wall_s": round(wall, 2),
                                      "peak_rss_gb": round(rss / 1e9, 3)}), flush=True)
                # in a child too: comparing reads both outputs, and every later child would start
                # with this process's memory as its own (ru_maxrss counts it)
                same = json.loads(subprocess.run([sys.executable, __file__, "--compare", str(ours), str(theirs)],
                                                 check=True, capture_output=True, text=True).stdout)
                print(json.dumps({"shape": args.shape, "gates": gates, "run": rep, "compare": same}), flush=True)
                speedup = measured["mergekit-moe"][0] / measured["sparsify"][0]
                best = summary.get(gates)
                if best is None or speedup > best["speedup"]:
                    summary[gates] = {"speedup": round(speedup, 2), "sparsify_peak_rss_gb": round(measured["sparsify"][1] / 1e9, 3),
                                      "mergekit_peak_rss_gb": round(measured["mergekit-moe"][1] / 1e9, 3),
                                      "same_tensors": same["equal"]}
                for out in (ours, theirs):
                    shutil.rmtree(out, ignore_errors=True)
        ok = all(s["speedup"] >= 1.5 and s["sparsify_peak_rss_gb"] < 1.5 and s["same_tensors"] for s in summary.values())
        print(json.dumps({"shape": args.shape, "summary": summary, "acceptance": ok}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
