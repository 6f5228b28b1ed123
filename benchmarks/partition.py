"""Expected all-to-all traffic and load balance of `sparsify partition`'s plan vs the contiguous
placement (the baseline), on routing with and without structure, at two sizes.

    python benchmarks/partition.py [--quick]

Cases (routing statistics counted as `sparsify profile` counts them):
  - demo-t5-e8: demo:t5 upcycled to 8 experts top-2 every other FFN (`sparsify upcycle demo:t5
    -e 8`), profiled on the built-in demo text (`sparsify profile --demo-text`): its routers as
    upcycled ("unstructured"), or set to co-select experts i and i + 4 ("structured": pairs
    the contiguous placement splits; `tests/partition/partition_workers.pair_routers`);
  - t5-base-like-e32: 12 MoE layers, hidden 768, 32 experts top-2, float32: sparsify's `Router`
    (softmax, top-2) on 65536 synthetic hidden states per layer (a shared direction plus
    Gaussian noise, which skews the load as a real model's hidden states do), with a random
    router ("unstructured") or one that co-selects pairs i, i + 16 ("structured").
For each, world sizes and tolerances (0, the default 0.01, 0.05): one JSON object with the
planned and contiguous traffic (bytes per token over all layers), imbalance (max/mean, mean over
layers), share of co-activation kept on one rank, the layers whose contiguous placement balances
within the tolerance (where the plan's traffic is guaranteed at most contiguous's), and the
layers whose balance and co-activation the branch and bound proved optimal. Counts, not
timings: the machine's load does not change them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "partition"))  # the routers that co-select pairs

from partition_workers import pair_routers, paired_router_weight  # noqa: E402

from sparsify.moe import MoEConfig, Router  # noqa: E402
from sparsify.partition.memory import Footprint  # noqa: E402
from sparsify.partition.planner import plan_placement  # noqa: E402
from sparsify.partition.stats import LayerStats, RoutingStats  # noqa: E402
from sparsify.plan import ExpertInit, FFNSite, LayerPlan, UpcyclePlan  # noqa: E402

TOLERANCES = (0.0, 0.01, 0.05)


def demo_t5(structured: bool) -> tuple[UpcyclePlan, RoutingStats]:
    """demo:t5 upcycled as `sparsify upcycle demo:t5 -e 8` does, profiled on the demo text."""
    import sparsify
    from sparsify.partition.calibration import DEMO_TEXT, calibration_batches, token_ids
    from sparsify.partition.profile import profile_routing

    model = sparsify.upcycle("demo:t5", experts=8)
    if structured:
        pair_routers(model)
    ids = token_ids(DEMO_TEXT, None, model.config.vocab_size)
    stats = profile_routing(model, calibration_batches(model, ids), {"source": "demo-text"})
    return model.sparsify_plan, stats


def t5_base_like(structured: bool, tokens: int, layers: int = 12, hidden: int = 768, experts: int = 32):
    """A plan of t5-base's shape (hidden 768, 12 MoE layers) and statistics of real top-2 routers
    on synthetic hidden states."""
    config = MoEConfig(num_experts=experts, top_k=2)
    paths = [f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.DenseReluDense"
             for stack in ("encoder", "decoder") for i in range(1, 2 * (layers // 2), 2)]
    sites = [FFNSite(p, "dense", "relu", hidden, 4 * hidden, {"w1": f"{p}.wi.weight", "w2": f"{p}.wo.weight"}, index=i)
             for i, p in enumerate(paths)]
    plan = UpcyclePlan(sites=sites, selected=list(paths),
                       layers={p: LayerPlan(config, [ExpertInit()] * experts) for p in paths})
    stats = RoutingStats(experts, 2, {p: LayerStats.empty(experts) for p in paths}, {"source": "synthetic"})
    with torch.no_grad():
        for i, p in enumerate(paths):
            g = torch.Generator().manual_seed(1000 + i)  # not the seed of `paired_router_weight`
            router = Router(hidden, config)
            if structured:
                router.weight.copy_(paired_router_weight(experts, hidden, seed=i))
            else:
                router.weight.copy_(torch.randn(experts, hidden, generator=g) * 4.0 / hidden**0.5)
            direction = torch.randn(hidden, generator=g)
            x = 0.5 * direction + torch.randn(tokens, hidden, generator=g)
            routing = router.eval()(x)
            stats.layers[p].add(routing.token_idx, routing.expert_idx, tokens)
    return plan, stats


def measure(case: str, profile: str, plan: UpcyclePlan, stats: RoutingStats, world_size: int, tolerance: float) -> dict:
    hidden = plan.selected_sites[0].hidden_size
    footprint = Footprint(0, {p: 1 for p in plan.selected}, 4)  # traffic does not depend on memory
    rep = plan_placement(plan, world_size, footprint, stats, tolerance=tolerance).report
    layers = list(rep["layers"].values())

    def mean(key: str, sub: bool = False) -> float:
        return round(sum((m["contiguous"] if sub else m)[key] for m in layers) / len(layers), 4)

    within = sum(m["contiguous"]["imbalance"] <= m["best_imbalance"] * (1 + tolerance) + 1e-6 for m in layers)
    return {
        "case": case, "profile": profile, "world_size": world_size, "tolerance": tolerance,
        "experts": rep["experts_per_layer"], "layers": len(layers), "hidden": hidden,
        "planned_bytes_per_token": round(rep["a2a_bytes_per_token"]),
        "contiguous_bytes_per_token": round(rep["contiguous_a2a_bytes_per_token"]),
        "traffic_vs_contiguous": round(rep["a2a_bytes_per_token"] / rep["contiguous_a2a_bytes_per_token"], 4),
        "planned_imbalance": rep["imbalance"], "contiguous_imbalance": rep["contiguous_imbalance"],
        "best_imbalance": mean("best_imbalance"),
        "planned_coactivation_kept": mean("coactivation_kept"),
        "contiguous_coactivation_kept": mean("coactivation_kept", True),
        "layers_contiguous_within_tolerance": within,
        "layers_balance_proven_optimal": sum(m["proven_optimal"]["balance"] for m in layers),
        "layers_traffic_proven_optimal": sum(m["proven_optimal"]["traffic"] for m in layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small case only")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "torch": torch.__version__}), flush=True)
    cases = [("demo-t5-e8", (2, 4), lambda s: demo_t5(s))]
    if not args.quick:
        cases.append(("t5-base-like-e32", (4, 8), lambda s: t5_base_like(s, tokens=65536)))
    for case, world_sizes, build in cases:
        for profile in ("unstructured", "structured"):
            plan, stats = build(profile == "structured")
            for n in world_sizes:
                for t in TOLERANCES:
                    print(json.dumps(measure(case, profile, plan, stats, n, t)), flush=True)


if __name__ == "__main__":
    main()
