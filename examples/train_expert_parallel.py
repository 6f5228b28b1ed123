"""Train an upcycled model expert-parallel on CPUs (gloo) or GPUs (NCCL).

    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py --steps 20

Rank 0 prepares the artifacts, the same that these commands make:

    sparsify upcycle demo:llama --experts 8 -o WORK/moe
    sparsify partition WORK/moe --world-size 2 -o WORK/plan.json
    sparsify shard WORK/moe --plan WORK/plan.json -o WORK/shards

then every rank loads only its own experts (`sparsify.load(WORK/shards, group=...)`), feeds its
own batch, and trains: tokens travel to their experts' ranks by all-to-all, gradients come
back the same way, and `sync_gradients` averages the replicated parameters' gradients as data
parallelism would. Rank 0 prints the loss averaged over ranks at each step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import sparsify
from sparsify.partition.expert_parallel import sync_gradients
from sparsify.partition.shards import write_shards
from sparsify.passes import PartitionExperts, PassManager


def prepare(work: Path, source: str, experts: int, top_k: int, world_size: int) -> Path:
    """Upcycle, save, partition and shard (rank 0 only); returns the shards directory."""
    model = sparsify.upcycle(source, experts=experts, top_k=top_k, noise=0.01)
    sparsify.save(model, work / "moe")
    PassManager([PartitionExperts(world_size=world_size)]).run(model, plan=model.sparsify_plan)
    model.sparsify_placement.save(work / "plan.json")
    return write_shards(work / "moe", work / "plan.json", work / "shards")


def batch_for(rank: int, vocab: int, batch: int, seq: int) -> torch.Tensor:
    """Each rank's own data: short random motifs repeated along the sequence (learnable)."""
    g = torch.Generator().manual_seed(1000 + rank)
    motif = torch.randint(0, vocab, (batch, 4), generator=g)
    return motif.repeat(1, seq // 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="demo:llama", help="dense model to upcycle (a causal LM)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write moe/, plan.json, shards/ [a temporary directory]")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    tmp = None
    if args.workdir is None and rank == 0:
        tmp = tempfile.TemporaryDirectory(prefix="sparsify-ep-")
    work = [str(args.workdir or tmp.name) if rank == 0 else None]
    dist.broadcast_object_list(work, src=0)  # every rank reads what rank 0 writes (one machine)
    work_dir = Path(work[0])
    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        for name in ("moe", "plan.json", "shards"):
            if (work_dir / name).exists():
                print(f"{work_dir / name} exists; pass an empty --workdir", file=sys.stderr)
                dist.destroy_process_group()
                return 2
        prepare(work_dir, args.source, args.experts, args.top_k, world)
    dist.barrier()

    model = sparsify.load(work_dir / "shards", group=dist.group.WORLD).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ids = batch_for(rank, model.config.vocab_size, args.batch, args.seq).to(device)
    losses = []
    for step in range(args.steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()  # in training, the loss of a sparsify.load model includes the router losses
        sync_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = out.loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} on {world} ranks ({'falls' if losses[-1] < losses[0] else 'DID NOT FALL'})")
    dist.barrier()
    dist.destroy_process_group()
    if tmp is not None:
        tmp.cleanup()
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
