"""Helpers for the partition tests: launching real gloo process groups, and the code each rank
runs. Worker functions live here (not in test files) so that spawned processes can import them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SPAWN_TIMEOUT = 150.0


def launch(fn, world_size: int, *args, timeout: float = SPAWN_TIMEOUT) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined in a gloo group
    (rendezvous through a file store: no ports). Re-raises a worker's failure; kills the
    workers and fails after `timeout` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn, world_size, store, args), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()


def _entry(rank: int, fn, world_size: int, store: str, args: tuple) -> None:
    # One thread per rank: ranks on a 2-core machine otherwise fight over cores (10x slower).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=90))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def skew_routers(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Make routing uneven on purpose: each router scores experts 0..3 along one direction
    (3, 2, -2, -3 times its projection) and the others 0, so experts 4.. never win and 0..3
    carry all the load, unevenly per token; router gradients stay meaningful (no saturation)."""
    from sparsify.moe import SparseMoE

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseMoE):
                e, h = m.router.weight.shape
                u = torch.randn(h, generator=g) / h**0.5
                s = torch.tensor([3.0, 2.0, -2.0, -3.0] + [0.0] * (e - 4))
                m.router.weight.copy_(s[:, None] * u[None, :])
    return model


def build_variant(name: str, plan_dict: dict, top_k: int) -> torch.nn.Module:
    """The demo model `name` upcycled by `plan_dict`, routed top-1 (switch) or top-2, skewed."""
    from sparsify.io.demo import build_demo
    from sparsify.plan import UpcyclePlan
    from sparsify.rewrite import apply_plan

    from sparsify.moe import MoEConfig

    plan = UpcyclePlan.from_dict(plan_dict)
    plan.set_routing(MoEConfig(**{**plan.moe.to_dict(), "top_k": top_k, "router": "switch" if top_k == 1 else "topk"}))
    model = apply_plan(build_demo(name), plan)
    model.sparsify_plan = plan
    return skew_routers(model).eval()


def _loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    from sparsify.verify import main_output

    out = main_output(model(**batch))
    return out, out.square().mean()


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want| (0 when both are zero)."""
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale else diff


def check_forward_backward(rank: int, n: int, cases: list[tuple[str, dict]], out_dir: str) -> None:
    """For each (demo, plan) and top-1/top-2: the expert-parallel model's outputs and gradients on
    this rank's batch equal the single-process model's on that batch; an expert's gradient
    equals the single-process gradients summed over all ranks' batches."""
    from sparsify.capture import example_inputs_for
    from sparsify.partition.expert_parallel import expert_parallel, sync_gradients
    from sparsify.partition.placement import ExpertPlacement

    report = {}
    for name, plan_dict in cases:
        for k in (1, 2):
            ref = build_variant(name, plan_dict, k)
            batch = example_inputs_for(ref, 2, 8, seed=100 + rank)
            want_out, loss = _loss(ref, batch)
            loss.backward()
            want = {p: t.grad.clone() for p, t in ref.named_parameters()}
            for p, g in want.items():
                if ".experts." in p:
                    dist.all_reduce(g)  # the sum over every rank's batch, each single-process
            placement = ExpertPlacement.contiguous(plan_dict["selected"], 8, n)
            ep = expert_parallel(build_variant(name, plan_dict, k), placement)
            out, loss = _loss(ep, batch)
            loss.backward()
            errors = {"output": close(out, want_out)}
            received = {}
            for p, t in ep.named_parameters():
                expected = want[p]
                if ".experts." in p:
                    layer = p.rsplit(".experts.", 1)[0]
                    expected = expected[placement.local_experts(layer, rank)]
                    received[layer] = bool(expected.abs().sum() > 0)
                errors[p] = close(t.grad, expected)
            # Data-parallel semantics: after sync, every gradient is that of the mean loss.
            p, t = next((p, t) for p, t in ep.named_parameters() if "router" in p)
            mean = want[p].clone()
            dist.all_reduce(mean)
            sync_gradients(ep)
            errors["synced router"] = close(t.grad, mean / n)
            worst = max(errors, key=errors.get)
            report[f"{name} top-{k}"] = {"worst": worst, "error": errors[worst], "experts_used": received}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def check_load(rank: int, n: int, native: str, shards: str, plan_path: str, out_dir: str) -> None:
    """Load the model expert-parallel from the native checkpoint (with plan.json) and from the
    shards; run this rank's batch; record outputs against the single-process model and the reads."""
    import sparsify
    from sparsify.capture import example_inputs_for
    from sparsify.verify import main_output

    single = sparsify.load(native)
    batch = example_inputs_for(single, 2, 8, seed=200 + rank)
    want = main_output(single(**batch))
    result = {}
    for kind, kwargs in (("native", {"placement": plan_path}), ("shards", {})):
        model = sparsify.load(native if kind == "native" else shards, group=dist.group.WORLD, **kwargs)
        with torch.no_grad():
            got = main_output(model(**batch))
        log = model.sparsify_read_log
        result[kind] = {
            "error": close(got, want),
            "files": sorted({r.file for r in log}),
            "expert_reads": [[r.tensor, r.start, r.stop, r.nbytes] for r in log if ".experts." in r.tensor],
            "bytes": sum(r.nbytes for r in log),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def paired_router_weight(num_experts: int, hidden: int, seed: int = 0, noise: float = 1e-3) -> torch.Tensor:
    """Router weights [E, H] that choose experts in pairs: expert i and expert i + E/2 (split by
    every contiguous placement) share one random direction, so their logits are nearly equal
    and top-2 routing picks both for almost every token; the pairs' popularity is whatever the
    hidden states make it."""
    g = torch.Generator().manual_seed(seed)
    half = num_experts // 2
    shared = torch.randn(half, hidden, generator=g) / hidden**0.5
    weight = torch.cat([shared, shared]) + noise * torch.randn(num_experts, hidden, generator=g) / hidden**0.5
    return weight * 4.0  # decisive routing, as a trained router's


def pair_routers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every MoE layer of `model` routers that co-select expert pairs (`paired_router_weight`)."""
    from sparsify.moe import SparseMoE

    with torch.no_grad():
        for i, m in enumerate(x for x in model.modules() if isinstance(x, SparseMoE)):
            e, h = m.router.weight.shape
            m.router.weight.copy_(paired_router_weight(e, h, seed + i))
    return model
