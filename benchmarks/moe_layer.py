"""MoE layer kernels against the dense-equivalent matmul, the limit an MoE forward can reach.

The dense-equivalent is one expert's FFN (the same linear/activation/gate ops) applied densely
to tokens x k rows: the same FLOPs with no routing, no gather, no scatter and one set of weights.
On CPU it is measured three ways: GEMMs by torch's F.linear (MKL), by oneDNN with packed
weights, and by oneDNN on 256-row tiles spread over the cores (single-threaded GEMMs, cache-sized
intermediates, as the cpu backend runs experts); `ratio_to_dense` is against the fastest of the
three in each round, the honest limit of the machine, and `ratio_to_<baseline>` against each
(`ratio_to_dense-equivalent-torch` is the baseline of issue 4's table). Every implementation runs
the whole layer (router included) on the same input; all are interleaved round by round and each
ratio is the median over rounds of (baseline time / implementation time) in that round, which
cancels slow drifts of a shared machine. Prints one JSON object per measurement; the 1-minute
load average of the machine is in each, since other processes on a small machine skew it.

CPU (default without a GPU): float32, 2 threads, 2048 tokens, two layer shapes:
    mixtral-like  hidden 1024, ffn 2816, 8 experts, top-2, SwiGLU
    switch-base   d_model 768, d_ff 3072, 32 experts, top-1 (switch routing), relu
implementations: the `cpu` and `reference` backends, and transformers' MixtralSparseMoeBlock /
SwitchTransformersSparseMLP built from configs with the same weights (dropless capacity).

CUDA (when a GPU is present, or --device cuda): bfloat16, Mixtral-8x7B layer (4096, 14336, 8,
top-2) at 1, 64, 4096 and 16384 tokens: the `triton` backend, the dense-equivalent, a
torch grouped_mm MoE (sort, grouped_mm, SwiGLU, grouped_mm, index_add), transformers' Mixtral
block with experts_implementation="grouped_mm", and the weight-bandwidth bound (time to read the
chosen experts' weights at the measured device copy bandwidth). The `triton-vs-torch-grouped_mm`
lines compare the two round by round (eager, and each replayed from a CUDA graph): median and
spread of the speedup, and in how many rounds the triton backend was the faster.

    python benchmarks/moe_layer.py                      # CPU, as in BENCHMARKS.md
    python benchmarks/moe_layer.py --shapes switch-base --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sparsify.activations import get_activation
from sparsify.kernels.reference import expert_counts
from sparsify.moe import Experts, MoEConfig, Router, SparseMoE


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    activation: str
    gated: bool
    router: str


SHAPES = {
    "mixtral-like": Shape("mixtral-like", 1024, 2816, 8, 2, "silu", True, "topk"),
    "switch-base": Shape("switch-base", 768, 3072, 32, 1, "relu", False, "switch"),
    "mixtral-8x7b": Shape("mixtral-8x7b", 4096, 14336, 8, 2, "silu", True, "topk"),
}


def build_moe(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> SparseMoE:
    """A SparseMoE of `shape` with random experts and router (seeded)."""
    g = torch.Generator().manual_seed(seed)
    cfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, router=shape.router)
    experts = Experts(shape.experts, shape.hidden, shape.ffn, form="gated" if shape.gated else "dense",
                      activation=shape.activation)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        router = Router(shape.hidden, cfg)
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * shape.hidden ** -0.5)
    return SparseMoE(router, experts.to(dtype)).to(device).eval()


def hf_block(shape: Shape, moe: SparseMoE, tokens: int, experts_implementation: str | None = None) -> torch.nn.Module:
    """transformers' own MoE block for `shape`, built from a config, holding `moe`'s weights."""
    e = moe.experts
    if shape.gated:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn, num_local_experts=shape.experts,
                               num_experts_per_tok=shape.top_k, hidden_act=shape.activation)
        config._experts_implementation = experts_implementation or "eager"  # a standalone block: say which
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(moe.router.weight)
            block.experts.gate_up_proj.copy_(torch.cat([e.w1, e.w3], dim=1))
            block.experts.down_proj.copy_(e.w2)
    else:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

        # Capacity = all tokens: dropless, the same work as the other implementations.
        config = SwitchTransformersConfig(d_model=shape.hidden, d_ff=shape.ffn, num_experts=shape.experts,
                                          expert_capacity=tokens, router_jitter_noise=0.0,
                                          dense_act_fn=shape.activation)
        block = SwitchTransformersSparseMLP(config)
        with torch.no_grad():
            block.router.classifier.weight.copy_(moe.router.weight)
            for i in range(shape.experts):
                block.experts[f"expert_{i}"].wi.weight.copy_(e.w1[i])
                block.experts[f"expert_{i}"].wo.weight.copy_(e.w2[i])
    return block.to(device=e.w1.device, dtype=e.w1.dtype).eval()


def dense_equivalent(shape: Shape, moe: SparseMoE, engine: str = "torch", tile: int | None = None
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One expert's FFN on tokens x k rows: the MoE's FLOPs as one dense FFN, its GEMMs run by
    `engine` (see `sparsify.kernels.cpu.gemm.ENGINES`; "torch" is F.linear; oneDNN gets its
    weights packed once, as the cpu backend's do). With `tile`, the rows go through in tiles of
    `tile` rows spread over the cores, single-threaded GEMMs each: intermediates stay in cache
    and no core waits for another, the strongest dense FFN here."""
    from sparsify.kernels.cpu.gemm import ENGINES, packed_experts
    from sparsify.kernels.cpu.pool import parallel_map

    linear, e, act = ENGINES[engine], moe.experts, get_activation(shape.activation)
    with torch.no_grad():
        w1, w2 = packed_experts(linear, e.w1[:1], 64)[0], packed_experts(linear, e.w2[:1], 64)[0]
        w3 = None if e.w3 is None else packed_experts(linear, e.w3[:1], 64)[0]
    fuse_relu = shape.activation == "relu"  # as the cpu backend does

    def ffn(rows: torch.Tensor) -> torch.Tensor:
        h = linear(rows, w1, None, fuse_relu)
        if not fuse_relu:
            h = act(h)
        if w3 is not None:
            h = h * linear(rows, w3, None, False)
        return linear(h, w2, None, False)

    def tiled(rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_empty(rows.shape)
        starts = range(0, rows.shape[0], tile)
        parallel_map(lambda s: out[s:s + tile].copy_(ffn(rows[s:s + tile])), starts)
        return out

    return tiled if tile else ffn


def grouped_mm_moe(moe: SparseMoE) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An MoE forward on torch's grouped_mm (None when this torch has none)."""
    gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if gmm is None:
        return None
    e, act = moe.experts, get_activation(moe.experts.activation)
    w1t, w2t = e.w1.transpose(1, 2), e.w2.transpose(1, 2)
    w3t = None if e.w3 is None else e.w3.transpose(1, 2)

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        r = moe.router(flat)
        order = torch.argsort(r.expert_idx, stable=True)
        offs = torch.cumsum(expert_counts(r.expert_idx, e.num_experts), 0).to(torch.int32)  # no host sync
        tok = r.token_idx[order]
        xs = flat[tok]
        h = act(gmm(xs, w1t, offs=offs))
        if w3t is not None:
            h = h * gmm(xs, w3t, offs=offs)
        y = gmm(h, w2t, offs=offs) * r.weight[order].to(x.dtype).unsqueeze(-1)
        return torch.zeros_like(flat).index_add_(0, tok, y).reshape(x.shape)

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved: every round runs each function once."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _machine(device: str, threads: int) -> dict:
    if device == "cuda":
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__}


def _report(base: dict, times: dict[str, list[float]], rows: int, baselines: list[str]) -> None:
    """One line per implementation; `ratio_to_dense` is against the fastest dense-equivalent of
    each round, `ratio_to_<baseline>` against each one."""
    best = [min(times[b][r] for b in baselines) for r in range(len(times[baselines[0]]))]
    for name, ts in times.items():
        med = statistics.median(ts)
        line = {**base, "impl": name, "median_ms": round(med * 1e3, 3), "tokens_per_s": round(rows / med, 1),
                "ratio_to_dense": round(statistics.median([b / t for b, t in zip(best, ts)]), 3)}
        if len(baselines) > 1:
            for b in baselines:
                line[f"ratio_to_{b}"] = round(statistics.median([d / t for d, t in zip(times[b], ts)]), 3)
        line.update(runs=len(ts), loadavg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        print(json.dumps(line), flush=True)


@torch.inference_mode()
def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for name in args.shapes or ["mixtral-like", "switch-base"]:
        shape = SHAPES[name]
        moe = build_moe(shape, torch.float32, "cpu")
        x = torch.randn(1, args.tokens, shape.hidden, generator=torch.Generator().manual_seed(1))
        rows = x.reshape(-1, shape.hidden).repeat(shape.top_k, 1)
        hf = hf_block(shape, moe, args.tokens)
        dense = {"dense-equivalent-torch": dense_equivalent(shape, moe, "torch")}
        if torch.backends.mkldnn.is_available():
            dense["dense-equivalent-onednn"] = dense_equivalent(shape, moe, "onednn")
            dense["dense-equivalent-onednn-tiled"] = dense_equivalent(shape, moe, "onednn", tile=256)

        def layer(backend: str) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                moe.backend = backend
                return moe(x)
            return run

        check = {b: (layer(b)() - hf(x)).abs().max().item() for b in ("cpu", "reference")}
        fns = {name: (lambda f=f: f(rows)) for name, f in dense.items()}
        fns.update({"cpu": layer("cpu"), "reference": layer("reference"), "transformers": lambda: hf(x)})
        times = measure(fns, args.rounds, args.warmup, "cpu")
        base = {"benchmark": "moe_layer", **_machine("cpu", args.threads), "dtype": "float32", "shape": name,
                "hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts, "top_k": shape.top_k,
                "activation": shape.activation, "tokens": args.tokens,
                "max_abs_diff_vs_transformers": {k: float(f"{v:.3g}") for k, v in check.items()}}
        _report(base, times, args.tokens, list(dense))


def _copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """`fn` captured in a CUDA graph and replayed (None when it cannot be captured): the layer's
    time without the host's launch overhead."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - report and go on without the graphed row
        print(json.dumps({"benchmark": "moe_layer", "note": f"CUDA graph capture failed: {err}"}))
        return None
    return graph.replay


def _kernel_times(fn: Callable[[], object], reps: int = 10) -> list[dict]:
    """GPU time per call of each kernel `fn` launches (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(ev.key, ev.device_time_total / reps / 1e3, ev.count // reps) for ev in prof.key_averages()
            if ev.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:80], "ms": round(ms, 4), "calls": n} for k, ms, n in rows[:10]]


def _gpu_gaps(fn: Callable[[], object]) -> dict:
    """One call of `fn` under torch.profiler: its wall time, the GPU's busy time in it, and the
    largest gaps between consecutive kernels (with the kernels on either side)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    if not kernels or not cpu:
        return {}
    t0 = min(e.time_range.start for e in cpu)
    gaps = []
    for a, b in zip(kernels, kernels[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            gaps.append((gap, a.name[:40], b.name[:40]))
    gaps.sort(reverse=True)
    return {"wall_us": round(kernels[-1].time_range.end - t0, 1),
            "first_kernel_at_us": round(kernels[0].time_range.start - t0, 1),
            "gpu_busy_us": round(sum(k.time_range.end - k.time_range.start for k in kernels), 1),
            "gaps_us": [(round(g, 1), a, b) for g, a, b in gaps[:6]]}


def _host_profile(fn: Callable[[], object], calls: int = 50) -> dict:
    """Where the host's time goes in `fn` (cProfile, top functions by own time), and whether `fn`
    makes the host wait for the device (torch's sync debug mode)."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    host_ms = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    rows = [{"fn": f"{path.rsplit('/', 1)[-1]}:{line}:{name}", "own_us": round(v[2] * 1e6 / calls, 1),
             "cum_us": round(v[3] * 1e6 / calls, 1)} for (path, line, name), v in top]
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        sync = None
    except RuntimeError as err:
        sync = str(err).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"host_ms_per_call_profiled": round(host_ms, 3), "host_sync": sync, "top": rows}


def _paired(base: dict, times: dict[str, list[float]], ours: str, theirs: str) -> None:
    """`ours` against `theirs` round by round (each round ran both, one after the other): the
    median and the spread of their time over ours, and in how many rounds ours was faster."""
    if ours not in times or theirs not in times:
        return
    speedups = sorted(t / o for o, t in zip(times[ours], times[theirs]))
    print(json.dumps({**base, "impl": f"{ours}-vs-{theirs}", "speedup_median": round(statistics.median(speedups), 4),
                      "speedup_min": round(speedups[0], 4), "speedup_max": round(speedups[-1], 4),
                      "faster_in_rounds": f"{sum(s > 1 for s in speedups)}/{len(speedups)}"}), flush=True)


@torch.inference_mode()
def run_cuda(args: argparse.Namespace) -> None:
    shape = SHAPES["mixtral-8x7b"]
    moe = build_moe(shape, torch.bfloat16, "cuda")
    moe.backend = "triton"
    dense = dense_equivalent(shape, moe, "torch")
    gmm = grouped_mm_moe(moe)
    hf = None
    try:
        hf = hf_block(shape, moe, 1, experts_implementation="grouped_mm")
    except Exception as err:  # an older transformers without the experts interface
        print(json.dumps({"benchmark": "moe_layer", "note": f"transformers grouped_mm block unavailable: {err}"}))
    bandwidth = _copy_bandwidth()
    weight_bytes = shape.top_k * (3 if shape.gated else 2) * shape.hidden * shape.ffn * 2
    for tokens in args.cuda_tokens:
        x = torch.randn(1, tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
        rows = x.reshape(-1, shape.hidden).repeat(shape.top_k, 1)
        fns = {"dense-equivalent": lambda: dense(rows), "triton": lambda: moe(x)}
        if gmm is not None:
            fns["torch-grouped_mm"] = lambda: gmm(x)
        if hf is not None:
            fns["transformers-grouped_mm"] = lambda: hf(x)
        out = moe(x)  # also tunes the kernels for this shape, before any timing
        moe.backend = "reference"
        ref = moe(x)
        moe.backend = "triton"
        check = {"rel_err_vs_reference": _rel_err(out, ref)}
        if gmm is not None:
            check["rel_err_grouped_mm_vs_reference"] = _rel_err(gmm(x), ref)
        graphed = _graphed(lambda: moe(x))
        if graphed is not None:
            fns["triton-cudagraph"] = graphed
        graphed_gmm = _graphed(lambda: gmm(x)) if gmm is not None else None
        if graphed_gmm is not None:
            fns["torch-grouped_mm-cudagraph"] = graphed_gmm
        times = measure(fns, args.rounds, args.warmup, "cuda")
        base = {"benchmark": "moe_layer", **_machine("cuda", 0), "dtype": "bfloat16", "shape": shape.name,
                "hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts, "top_k": shape.top_k,
                "tokens": tokens, "copy_bandwidth_GBps": round(bandwidth / 1e9, 1)}
        _report({**base, **check}, times, tokens, ["dense-equivalent"])
        _paired(base, times, "triton", "torch-grouped_mm")
        _paired(base, times, "triton-cudagraph", "torch-grouped_mm-cudagraph")
        bound = weight_bytes / bandwidth
        if "triton-cudagraph" in fns:
            # the graph replayed back to back and timed by device events (no host round trip per call)
            from triton.testing import do_bench_cudagraph

            times["triton-cudagraph-events"] = [do_bench_cudagraph(lambda: moe(x), rep=100, return_mode="median") / 1e3]
        for name in ("triton", "triton-cudagraph", "triton-cudagraph-events"):
            if name in times:
                t = statistics.median(times[name])
                print(json.dumps({**base, "impl": f"{name}-vs-weight-bandwidth", "bound_ms": round(bound * 1e3, 4),
                                  "median_ms": round(t * 1e3, 4), "time_over_bound": round(t / bound, 3)}),
                      flush=True)
        if args.profile:
            print(json.dumps({**base, "impl": "triton-kernels", "kernels": _kernel_times(lambda: moe(x))}), flush=True)
            print(json.dumps({**base, "impl": "triton-eager-timeline", **_gpu_gaps(lambda: moe(x))}), flush=True)
            if tokens == min(args.cuda_tokens):
                print(json.dumps({**base, "impl": "triton-host", **_host_profile(lambda: moe(x))}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shapes", nargs="*", choices=["mixtral-like", "switch-base"])
    parser.add_argument("--cuda-tokens", type=int, nargs="*", default=[1, 64, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="CUDA: also print each kernel's GPU time")
    args = parser.parse_args()
    if args.device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
