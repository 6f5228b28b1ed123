"""Sparse upcycling end to end, on a CPU in about half a minute: train a small dense Llama, upcycle
it into an MoE (every FFN becomes 8 experts that start as its copies, plus a fresh top-2 router),
and keep training the MoE with the load-balancing and router z losses, which an upcycled model
adds to the loss it returns in training (`model(input_ids=..., labels=...).loss`).

The text is Python's own standard library source, read as bytes (a byte-level vocabulary fits
the demo model's 512 token ids), so nothing is downloaded. The script reports, as it trains:

- the language-model loss on held-out text (it should fall, through the upcycling too: at the
  moment of upcycling the MoE computes exactly what the dense model did);
- each MoE layer's load: the share of (token, expert) assignments every expert receives, and
  the balancing loss (1.0 is perfectly balanced), from `sparsify.training.RoutingTotals` (the
  sums behind `sparsify.router_stats`) over the held-out text;
- how far the experts have drifted apart: the mean relative distance between two experts'
  weights, ||W_i - W_j|| / ||W_i|| (0 at upcycling, when they are identical copies).

    python examples/finetune_upcycled.py                       # 80 dense + 120 MoE steps
    python examples/finetune_upcycled.py --no-balance          # watch experts starve
    python examples/finetune_upcycled.py --steps 40 --dense-steps 20 --json   # a quick check

The last line is a JSON summary. The demo model's matrices are too small to gain from a second
thread, and a second thread costs much on a busy machine, so it runs on one (`--threads`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import math
import time

import torch

import sparsify
from sparsify.io.demo import build_demo
from sparsify.moe import SparseMoE
from sparsify.training import RoutingTotals

CORPUS_MODULES = ["argparse", "difflib", "textwrap", "json.decoder", "json.encoder", "inspect", "dataclasses",
                  "functools", "collections", "pathlib", "tokenize", "string", "calendar", "fractions", "statistics"]


def corpus() -> torch.Tensor:
    """Bytes of some standard-library sources, as token ids 0..255."""
    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random windows of `seq + 1` tokens."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, held_out: list[torch.Tensor]) -> float:
    """Mean held-out language-model loss (in eval mode the loss is the task loss alone)."""
    model.eval()
    loss = sum(model(input_ids=w, labels=w).loss.item() for w in held_out) / len(held_out)
    model.train()
    return loss


def moe_layers(model) -> dict[str, SparseMoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseMoE)}


@torch.no_grad()
def router_stats(model, windows: list[torch.Tensor]) -> dict[str, float]:
    """`sparsify.router_stats` over all of `windows`: each forward's routing added up."""
    totals = RoutingTotals()
    model.eval()
    for window in windows:
        model(input_ids=window)
        totals.add(model)
    model.train()
    return totals.summary()


def per_layer(stats: dict[str, float], name: str) -> dict[str, object]:
    """One layer's statistics: {"load": [share per expert], "balancing_loss": ..., ...}."""
    prefix = f"router/{name}/"
    mine = {k.removeprefix(prefix): v for k, v in stats.items() if k.startswith(prefix)}
    load = [mine.pop(f"load/{e}") for e in range(sum(k.startswith("load/") for k in mine))]
    return {"load": load, **mine}


@torch.no_grad()
def expert_drift(model) -> dict[str, float]:
    """Mean over expert pairs of ||W_i - W_j|| / ||W_i||, all weight matrices of an expert together."""
    out = {}
    for name, moe in moe_layers(model).items():
        ex = moe.experts
        flat = torch.cat([w.reshape(ex.num_experts, -1) for w in (ex.w1, ex.w2, ex.w3) if w is not None], dim=1)
        dist = torch.cdist(flat, flat) / flat.norm(dim=1, keepdim=True)
        e = ex.num_experts
        out[name] = (dist.sum() / (e * (e - 1))).item()
    return out


def train(model, data, steps: int, args, label: str, log) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    windows = batches(data, args.batch, args.seq, seed=args.seed + len(label))
    model.train()
    for step in range(1, steps + 1):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        for group in opt.param_groups:
            group["lr"] = lr
        window = next(windows)
        loss = model(input_ids=window, labels=window).loss  # an MoE's includes its router losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps:
            log(label, step, loss.item() - sparsify.aux_losses(model).item())  # the task loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-steps", type=int, default=80, help="training steps of the dense model first")
    parser.add_argument("--steps", type=int, default=120, help="training steps after upcycling")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="every N-th FFN becomes an MoE")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-balance", action="store_true", help="train without the load-balancing loss")
    parser.add_argument("--backend", default="auto", help="MoE kernels: auto | reference | cpu | triton")
    parser.add_argument("--log-every", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="only print the JSON summary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    data = corpus()
    split = int(0.95 * data.numel())
    train_data, held = data[:split], data[split:]
    held_out = list(itertools.islice(batches(held, args.batch, args.seq, seed=99), 4))
    say = (lambda *a: None) if args.json else print
    say(f"corpus: {data.numel():,} bytes of Python stdlib source; held out {held.numel():,}")

    def log(label: str, step: int, loss: float) -> None:
        say(f"[{label} {step:4d}] train loss {loss:.3f}  held-out {evaluate(model, held_out):.3f}"
            f"  ({time.time() - started:.0f}s)")

    model = build_demo("llama", seed=args.seed)
    first_loss = evaluate(model, held_out)
    say(f"dense demo:llama, untrained: held-out loss {first_loss:.3f}")
    train(model, train_data, args.dense_steps, args, "dense", log)
    dense_loss = evaluate(model, held_out)

    model.eval()
    model = sparsify.upcycle(model, experts=args.experts, top_k=args.top_k, every=args.every, backend=args.backend,
                             aux_loss_coef=0.0 if args.no_balance else 0.01)
    upcycled_loss = evaluate(model, held_out)
    backends = sorted({m.backend for m in moe_layers(model).values()})
    say(f"upcycled: {len(moe_layers(model))} MoE layers x {args.experts} experts, top-{args.top_k}, kernels {backends};"
        f" held-out loss {upcycled_loss:.3f} (dense: {dense_loss:.3f})")
    train(model, train_data, args.steps, args, "moe", log)

    final_loss = evaluate(model, held_out)
    stats = router_stats(model, held_out)
    layers = {name: per_layer(stats, name) for name in moe_layers(model)}
    loads = {name: layer["load"] for name, layer in layers.items()}
    drift = expert_drift(model)
    for name, layer in layers.items():
        shares = " ".join(f"{s:.3f}" for s in layer["load"])
        say(f"{name}: expert shares [{shares}]  balancing loss {layer['balancing_loss']:.3f}"
            f"  entropy {layer['entropy']:.2f}  drift {drift[name]:.3f}")
    summary = {
        "loss_untrained": round(first_loss, 4), "loss_dense": round(dense_loss, 4),
        "loss_upcycled": round(upcycled_loss, 4), "loss_final": round(final_loss, 4),
        "loss_fell": final_loss < upcycled_loss < first_loss,
        "balance_loss": round(sum(v["balancing_loss"] for v in layers.values()) / len(layers), 4),
        "min_expert_share": round(min(min(v) for v in loads.values()), 4),
        "experts_without_tokens": sum(s == 0 for v in loads.values() for s in v),
        "expert_drift": {k: round(v, 4) for k, v in drift.items()},
        "balancing": not args.no_balance, "backends": backends, "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
