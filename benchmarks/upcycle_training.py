"""Sparse upcycling's experiment (Komatsuzaki et al. 2022) at a size a 2-core CPU can run.

A small dense Llama is pretrained for a fixed budget; then four arms train on for the same extra
tokens, on the same batches in the same order:

- `dense`: the dense model, trained further;
- `upcycled`: the dense model upcycled by copying (8 experts, top-2, every other FFN);
- `drop-upcycled`: the same, with half of each expert's intermediate neurons re-initialised
  (Drop-Upcycling, r = 0.5: `sparsify.upcycle(..., drop_ratio=0.5)`);
- `scratch`: the same MoE architecture trained from a random initialisation (independent experts)
  for the pretraining plus the extra budget.

The text is the Python standard library's own source (`*.py` outside its test suites, present on
every Python installation), split by file into train and held-out parts; a byte-level BPE
tokenizer (the `tokenizers` library) is trained on the train part. Every arm is measured by its
held-out loss against its extra training FLOPs, counted from active parameters: per token
6 * (active non-embedding parameters + the LM head) + 6 * layers * sequence * hidden (attention
scores), as in Kaplan et al. 2020. For `scratch`, extra FLOPs are its total FLOPs minus the
dense pretraining's, the cost the other arms share; it starts below zero.

Learning rate: one schedule over pretraining plus the extra budget (linear warm-up, constant,
then a cosine decay to a tenth over the extra steps); the dense pretraining runs its first part,
the continued arms its extra part (with a fresh AdamW), `scratch` all of it.

    python benchmarks/upcycle_training.py                 # the whole experiment (~45 min, 2 cores)
    python benchmarks/upcycle_training.py --quick         # a smaller setting (< 10 min)
    python benchmarks/upcycle_training.py --setting tiny  # seconds: what CI runs for correctness

Prints JSON lines: one `setting` object, then per arm one object per evaluation (`arm`, `step`,
`tokens`, `extra_flops`, `heldout_loss`) and a closing `summary` object (final loss, active
parameters, seconds, ms per step, the sha256 of the batches it trained on). The same lines go
to OUT/upcycle_training.jsonl and the plot to OUT/upcycle_training.png
(OUT: --out, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import sparsify
from sparsify.moe import SparseMoE

ARMS = ("dense", "upcycled", "drop-upcycled", "scratch")
EXPERTS, TOP_K, EVERY, DROP_RATIO = 8, 2, 2, 0.5


@dataclass(frozen=True)
class Setting:
    """One size of the experiment."""

    corpus_mb: float        # train text read from the standard library (held-out: every 20th file)
    vocab: int              # BPE vocabulary
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq: int
    batch: int
    pretrain_steps: int
    extra_steps: int
    evals: int              # evaluations per arm over its steps (plus one at its start)
    eval_windows: int       # held-out windows of `seq` tokens per evaluation
    lr: float = 3e-3
    warmup: float = 0.05    # share of the pretraining steps
    threads: int | None = None  # torch threads (None: torch's default, one per core)


SETTINGS = {
    # about 45 minutes on a 2-core machine (BENCHMARKS.md says how it was sized and measured)
    "full": Setting(corpus_mb=12.0, vocab=4096, hidden=128, intermediate=512, layers=4, heads=4, seq=128,
                    batch=16, pretrain_steps=1000, extra_steps=500, evals=10, eval_windows=64),
    "quick": Setting(corpus_mb=2.0, vocab=2048, hidden=96, intermediate=384, layers=4, heads=4, seq=96,
                     batch=16, pretrain_steps=300, extra_steps=150, evals=6, eval_windows=32),
    "tiny": Setting(corpus_mb=0.25, vocab=384, hidden=32, intermediate=64, layers=2, heads=2, seq=32,
                    batch=8, pretrain_steps=40, extra_steps=24, evals=3, eval_windows=8, lr=1e-2, threads=1),
}

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}


def stdlib_corpus(megabytes: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): the standard library's source files in path order, every
    20th file held out, until the train part has `megabytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS & set(f.relative_to(root).parts))
    train, held, size = [], [], 0
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        if i % 20 == 0:
            held.append(text)
        elif size < megabytes * 1e6:
            train.append(text)
            size += len(text)
    return train, held


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor([i for enc in tok.encode_batch(texts) for i in enc.ids], dtype=torch.long)


def dense_model(s: Setting, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=s.seq,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def upcycle(model, drop_ratio: float | None = None):
    extra = {} if drop_ratio is None else {"drop_ratio": drop_ratio}
    return sparsify.upcycle(copy.deepcopy(model), experts=EXPERTS, top_k=TOP_K, every=EVERY, **extra)


def scratch_moe(s: Setting, seed: int):
    """The upcycled architecture with every weight drawn fresh: independent experts, each
    initialised as the dense class initialises an FFN (normal, std initializer_range)."""
    moe = upcycle(dense_model(s, seed + 1))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in moe.modules():
            if isinstance(m, SparseMoE):
                for p in m.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * moe.config.initializer_range)
    return moe


def flops_per_token(model, s: Setting) -> tuple[float, int]:
    """(training FLOPs per token, active parameters): see the module docstring."""
    active = model.get_input_embeddings().weight.numel()  # as the tied LM head's matmul
    moe_params = set()
    for m in model.modules():
        if isinstance(m, SparseMoE):
            experts = sum(p.numel() for p in m.experts.parameters())
            active += m.router.weight.numel() + experts * m.config.top_k // m.config.num_experts
            moe_params |= {id(p) for p in m.parameters()}
    embedding = id(model.get_input_embeddings().weight)
    active += sum(p.numel() for p in model.parameters() if id(p) not in moe_params and id(p) != embedding)
    return 6.0 * active + 6.0 * s.layers * s.seq * s.hidden, active


def lr_at(step: int, s: Setting) -> float:
    """The one schedule over pretraining + extra steps (module docstring)."""
    warmup = max(1, int(s.warmup * s.pretrain_steps))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    if step < s.pretrain_steps:
        return s.lr
    t = (step - s.pretrain_steps) / max(1, s.extra_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Batches:
    """The batches of every step, fixed by the seed: step i's window starts are drawn once, so
    every arm that trains on step i sees the same tokens, whichever arm runs first."""

    def __init__(self, ids: torch.Tensor, s: Setting, seed: int):
        g = torch.Generator().manual_seed(seed)
        total = s.pretrain_steps + s.extra_steps
        self.ids, self.seq, self.pretrain_steps = ids, s.seq, s.pretrain_steps
        self.starts = torch.randint(0, ids.numel() - s.seq - 1, (total, s.batch), generator=g)

    def __getitem__(self, step: int) -> torch.Tensor:
        return torch.stack([self.ids[i:i + self.seq + 1] for i in self.starts[step].tolist()])

    def sha256(self, steps: range) -> str:
        return hashlib.sha256(self.starts[steps.start:steps.stop].numpy().tobytes()).hexdigest()

    def phases(self, steps: range) -> list[tuple[str, range]]:
        """`steps` split into its pretraining and extra steps."""
        cut = min(max(self.pretrain_steps, steps.start), steps.stop)
        return [("pretrain", range(steps.start, cut)), ("extra", range(cut, steps.stop))]


def lm_loss(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor]) -> float:
    was = model.training
    model.eval()
    loss = sum(lm_loss(model, w).item() for w in windows) / len(windows)
    model.train(was)
    return loss


def run_arm(arm: str, model, steps: range, flops_offset: float, batches: Batches, held: list[torch.Tensor],
            s: Setting, emit) -> dict:
    """Train `model` on `batches[steps]`, evaluating at the start and `s.evals` times; emit rows."""
    per_token, active = flops_per_token(model, s)
    tokens_per_step = s.batch * s.seq
    marks = {steps.start + round(i * len(steps) / s.evals) for i in range(1, s.evals + 1)}
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    model.train()
    started, first = time.perf_counter(), None

    def evaluate(done: int, train_loss: float | None) -> None:
        nonlocal first
        loss = heldout_loss(model, held)
        first = loss if first is None else first
        tokens = done * tokens_per_step
        emit({"arm": arm, "step": steps.start + done, "tokens": tokens, "extra_flops": flops_offset + tokens * per_token,
              "heldout_loss": loss, "train_loss": train_loss})

    evaluate(0, None)
    train_time = 0.0
    for done, step in enumerate(steps, start=1):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        window = batches[step]
        # A plain-loop forward of a sparsify model returns no loss without labels; the task loss
        # is written out here, the router losses added from the layers (sparsify.aux_losses).
        loss = lm_loss(model, window)
        (loss + sparsify.aux_losses(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - tick
        if step + 1 in marks:
            evaluate(done, loss.item())
    summary = {"arm": arm, "summary": True, "steps": len(steps), "tokens": len(steps) * tokens_per_step,
               "extra_flops": flops_offset + len(steps) * tokens_per_step * per_token,
               "heldout_loss": heldout_loss(model, held), "heldout_loss_start": first,
               "active_params": active, "total_params": sum(p.numel() for p in model.parameters()),
               "flops_per_token": per_token, "ms_per_step": 1000 * train_time / max(1, len(steps)),
               "seconds": round(time.perf_counter() - started, 1),
               # what it trained on, per phase (pretraining steps, extra steps): equal across arms
               "batches_sha256": {phase: batches.sha256(r) if len(r) else None for phase, r in batches.phases(steps)}}
    emit(summary)
    return summary


# Line styles that keep curves apart where they overlap (the two upcycled arms nearly coincide).
_STYLES = {
    "pretrain": {"color": "grey", "linestyle": "--", "marker": "o", "label": "dense pretraining"},
    "dense": {"color": "tab:blue", "marker": "o", "label": "dense"},
    "upcycled": {"color": "tab:orange", "marker": "s", "markersize": 5, "label": "upcycled"},
    "drop-upcycled": {"color": "tab:green", "linestyle": "--", "marker": "^", "label": "drop-upcycled"},
    "scratch": {"color": "tab:red", "marker": "o", "label": "scratch (its FLOPs less the dense pretraining's)"},
}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Held-out loss against extra FLOPs: the whole run, and beside it the continuation alone
    (extra FLOPs from 0), where the arms are compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
    near: list[float] = []
    for arm in ("pretrain", *ARMS):
        points = [(r["extra_flops"], r["heldout_loss"]) for r in rows if r.get("arm") == arm and not r.get("summary")]
        if not points:
            continue
        style = {"markersize": 3, **_STYLES[arm]}
        whole.plot(*zip(*points), **style)
        later = [(x, y) for x, y in points if x >= 0]
        if arm != "pretrain" and later:
            zoom.plot(*zip(*later), **style)
            near += [y for _, y in later[1:]]  # the scratch arm's start is far above the others
    for ax in (whole, zoom):
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("extra training FLOPs, from active parameters")
        ax.grid(alpha=0.3)
    if near:
        pad = 0.05 * (max(near) - min(near) or 1.0)
        zoom.set_ylim(min(near) - pad, max(near) + pad)
    whole.set_ylabel("held-out loss (nats/token)")
    whole.set_title("the whole run", fontsize=9)
    zoom.set_title("the continuation (extra FLOPs from 0)", fontsize=9)
    whole.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(setting: dict) -> str:
    """The plot's title, from a run's first JSON line (its setting)."""
    s = setting
    return (f"upcycling at {s['setting']} size: {s['layers']} layers, d={s['hidden']}, {s['experts']} experts "
            f"top-{s['top_k']}, {s['pretrain_steps']}+{s['extra_steps']} steps of {s['batch']}x{s['seq']} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="full")
    parser.add_argument("--quick", action="store_true", help="the quick setting (same as --setting quick)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--pretrain-steps", type=int, help="override the setting's pretraining steps")
    parser.add_argument("--extra-steps", type=int, help="override the setting's extra steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: the setting's; tiny uses 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--replot", type=Path, metavar="JSONL",
                        help="only draw the plot of a finished run's JSON lines (the PNG beside them)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        rows = [json.loads(line) for line in args.replot.read_text().splitlines() if line.strip()]
        png = args.replot.with_suffix(".png")
        plot(rows, png, _title(rows[0]))
        print(json.dumps({"png": str(png)}))
        return 0
    name = "quick" if args.quick else args.setting
    s = SETTINGS[name]
    s = replace(s, pretrain_steps=args.pretrain_steps or s.pretrain_steps, extra_steps=args.extra_steps or s.extra_steps,
                threads=args.threads or s.threads)
    unknown = [a for a in args.arms.split(",") if a.strip() not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    threads = torch.get_num_threads()
    if s.threads:
        # tiny models gain nothing from a second thread, and lose much when the cores are busy
        torch.set_num_threads(s.threads)
    try:
        return _experiment(name, s, args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _experiment(name: str, s: Setting, args: argparse.Namespace) -> int:
    arms = [a.strip() for a in args.arms.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "upcycle_training" if name == "full" else f"upcycle_training_{name}"
    jsonl, png = args.out / f"{stem}.jsonl", args.out / f"{stem}.png"
    rows: list[dict] = []
    sink = jsonl.open("w")

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    started = time.perf_counter()
    train_texts, held_texts = stdlib_corpus(s.corpus_mb)
    tok = train_tokenizer(train_texts, s.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    n = min(s.eval_windows, held_ids.numel() // (s.seq + 1))
    held = [held_ids[i * (s.seq + 1):(i + 1) * (s.seq + 1)].unsqueeze(0) for i in range(n)]
    held = [torch.cat(held[i:i + 8]) for i in range(0, n, 8)]  # evaluated 8 windows at a time
    batches = Batches(train_ids, s, args.seed)
    emit({"setting": name, **asdict(s), "arms": arms, "seed": args.seed, "experts": EXPERTS, "top_k": TOP_K,
          "every": EVERY, "drop_ratio": DROP_RATIO, "threads": torch.get_num_threads(),
          "python": sys.version.split()[0], "torch": torch.__version__, "corpus_train_files": len(train_texts),
          "corpus_heldout_files": len(held_texts), "train_tokens": train_ids.numel(),
          "heldout_tokens": n * (s.seq + 1), "tokenizer_seconds": round(time.perf_counter() - started, 1)})

    pre, extra = range(0, s.pretrain_steps), range(s.pretrain_steps, s.pretrain_steps + s.extra_steps)
    dense = dense_model(s, args.seed)
    pre_summary = run_arm("pretrain", dense, pre, -s.pretrain_steps * s.batch * s.seq * flops_per_token(dense, s)[0],
                          batches, held, s, emit)
    dense_pretrain_flops = pre_summary["tokens"] * pre_summary["flops_per_token"]
    pretrained = copy.deepcopy(dense)
    for arm in arms:
        torch.manual_seed(args.seed)
        if arm == "dense":
            run_arm(arm, copy.deepcopy(pretrained), extra, 0.0, batches, held, s, emit)
        elif arm == "upcycled":
            run_arm(arm, upcycle(pretrained), extra, 0.0, batches, held, s, emit)
        elif arm == "drop-upcycled":
            run_arm(arm, upcycle(pretrained, drop_ratio=DROP_RATIO), extra, 0.0, batches, held, s, emit)
        else:
            run_arm(arm, scratch_moe(s, args.seed), range(0, extra.stop), -dense_pretrain_flops, batches, held, s,
                    emit)
    sink.close()
    plot(rows, png, _title(rows[0]))
    print(json.dumps({"jsonl": str(jsonl), "png": str(png), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
