"""ONNX Runtime latency of MoE models: fused `com.microsoft.MoE` vs standard ops vs torch eager.

    python benchmarks/onnx_runtime.py [--threads 2] [--tokens 2048] [--quick] [--case NAME]

Cases, each exported once and run every way on the same inputs in the same run:
  - demo-llama-moe-e8 / -e32: demo:llama (SwiGLU experts) upcycled with 8 or 32 experts (the
    Sparse Upcycling paper's choice), top-2, every FFN; batch 8 x seq 128;
  - demo-t5-encoder-moe-e8: demo:t5's encoder graph (ReLU experts), 8 experts, top-2;
  - mixtral-like-layer: one MoE layer, hidden 1024, ffn 2816, 8 experts, top-2, SwiGLU,
    `--tokens` tokens (the Mixtral-like shape of the kernels benchmark).
Implementations: ort-fused (`--target ort`), ort-standard (`--target standard`: every expert
on every token), torch-eager-reference (the sparsify model with the reference kernels: the
baseline) and torch-eager-auto (with the kernels `sparsify.upcycle` picks). One JSON object per
measurement: median latency over rounds that run them in turn (so that load from other
processes falls on all alike), tokens/s, speed-up over the baseline, and the largest difference
from the baseline's output relative to its largest magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsify  # noqa: E402
from sparsify.kernels.dispatch import check_backend  # noqa: E402
from sparsify.moe import MoEConfig, SparseMoE  # noqa: E402
from sparsify.onnx.export import capture_onnx, lower_onnx  # noqa: E402
from sparsify.onnx.signatures import EncoderGraph, ModelGraph  # noqa: E402
from sparsify.rewrite import build_moe  # noqa: E402
from sparsify.plan import FFNSite  # noqa: E402


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interleaved_medians(runs: dict, min_rounds: int, budget_s: float) -> dict[str, float]:
    """Median milliseconds of each callable, timed in rounds that run each once in turn, so
    that load from other processes on a shared machine falls on all of them alike."""
    for fn in runs.values():
        fn()  # warm-up (allocations, ONNX Runtime's first-run planning)
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while len(times[next(iter(runs))]) < min_rounds or (time.perf_counter() - start < budget_s
                                                          and len(times[next(iter(runs))]) < 50):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


class _Layer(nn.Module):
    def __init__(self, moe: SparseMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states)


def _mixtral_like(tokens: int) -> tuple[nn.Module, dict, dict, dict]:
    h, i, e = 1024, 2816, 8
    site = FFNSite(path="layer", form="gated", activation="silu", hidden_size=h, intermediate_size=i, weights={})
    moe = build_moe(site, MoEConfig(num_experts=e, top_k=2), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
    layer = _Layer(moe).eval()
    d = torch.export.Dim.DYNAMIC
    example = {"hidden_states": torch.randn(2, 8, h, generator=g)}
    inputs = {"hidden_states": torch.randn(1, tokens, h, generator=g)}
    return layer, example, {"hidden_states": {0: d, 1: d}}, inputs


def _demo(name: str, experts: int, batch: int, seq: int) -> tuple[nn.Module, dict, dict, dict]:
    """demo:NAME upcycled (every FFN, top-2); T5 is benchmarked through its encoder graph."""
    model = sparsify.upcycle(f"demo:{name}", experts=experts, top_k=2, every=1, noise=0.01, router_init_std=0.5)
    wrapper = (EncoderGraph if model.config.is_encoder_decoder else ModelGraph)(model).eval()
    d = torch.export.Dim.DYNAMIC
    g = torch.Generator().manual_seed(0)
    example = {"input_ids": torch.randint(0, 512, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    ids = torch.randint(0, 512, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return wrapper, example, {"input_ids": {0: d, 1: d}, "attention_mask": {0: d, 1: d}}, inputs


def _session(model: ir.Model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Each session owns a thread pool whose workers spin after every run; timed in turn, one
    # session's spinning workers take the cores from the next one (twice the time on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _torch_runs(module: nn.Module, inputs: dict) -> tuple[dict, dict, dict]:
    """torch eager with the reference kernels (the oracle, the baseline) and with the kernels
    "auto" picks (what `sparsify.upcycle` uses); a backend that fails is reported, not timed."""
    layers = [m for m in module.modules() if isinstance(m, SparseMoE)]
    e = layers[0].experts
    runs, outputs, extra = {}, {}, {}
    for backend in ("reference", "auto"):
        impl = f"torch-eager-{backend}"
        extra[impl] = {"torch_backend": check_backend(backend, torch.device("cpu"), e.w1.dtype, e.activation)}

        @torch.no_grad()
        def run(backend=backend):
            for m in layers:
                m.backend = backend
            return module(**inputs)

        try:
            outputs[impl] = run().float().numpy()
        except Exception as err:  # another backend's bug must not stop the ONNX measurements
            extra[impl]["error"] = f"{type(err).__name__}: {err}"[:200]
            continue
        runs[impl] = run
    return runs, outputs, extra


def bench_case(name: str, module: nn.Module, example: dict, shapes: dict, inputs: dict, threads: int,
               min_rounds: int, budget_s: float) -> list[dict]:
    """Time torch eager, ONNX Runtime with standard ops and ONNX Runtime fused, interleaved,
    on the same inputs; one row per implementation."""
    tokens = int(np.prod(next(iter(inputs.values())).shape[:2]))
    feeds = {k: v.numpy() for k, v in inputs.items()}
    runs, outputs, extra = _torch_runs(module, inputs)
    ref = outputs["torch-eager-reference"]
    for impl, target in (("ort-standard", "standard"), ("ort-fused", "ort")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = capture_onnx(module, example, shapes)
        report = lower_onnx(model, target)
        session = _session(model, threads)
        runs[impl] = lambda s=session: s.run(None, feeds)
        outputs[impl] = session.run(None, feeds)[0]
        fused = sum(1 for n in model.graph if n.op_type == "MoE" and n.domain == "com.microsoft")
        extra[impl] = {"moe_nodes": fused, "left_unfused": len(report.left)}
    medians = _interleaved_medians(runs, min_rounds, budget_s)
    base = medians["torch-eager-reference"]
    rows = []
    for impl in extra:
        row = {"bench": "onnx_runtime", "case": name, "impl": impl, "tokens": tokens, "threads": threads}
        if impl in medians:
            ms = medians[impl]
            row.update(median_ms=round(ms, 3), tokens_per_s=round(tokens / ms * 1000, 1),
                       speedup_vs_torch_reference=round(base / ms, 3),
                       max_rel_diff_vs_torch=float(np.abs(outputs[impl] - ref).max() / np.abs(ref).max()))
        rows.append({**row, **extra[impl]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the Mixtral-like layer")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke test)")
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="run only this case (repeatable); default: every case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "torch": torch.__version__}
    min_rounds, budget = (2, 0.5) if args.quick else (5, 20.0)
    tokens = 256 if args.quick else args.tokens
    batch, seq = (2, 32) if args.quick else (8, 128)
    cases = {"demo-llama-moe-e8": lambda: _demo("llama", 8, batch, seq),
             "demo-llama-moe-e32": lambda: _demo("llama", 32, batch, seq),
             "demo-t5-encoder-moe-e8": lambda: _demo("t5", 8, batch, seq),
             "mixtral-like-layer": lambda: _mixtral_like(tokens)}
    unknown = sorted(set(args.case) - set(cases))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    for name, make in cases.items():
        if args.case and name not in args.case:
            continue
        for row in bench_case(name, *make(), args.threads, min_rounds, budget):
            print(json.dumps({**row, **machine}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
