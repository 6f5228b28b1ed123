"""What a placement of one layer costs: per-rank load, imbalance, and all-to-all traffic.

Each MoE layer waits for its slowest rank, so the time of a layer is set by the rank with the
most assignments: the imbalance max/mean is the slowdown against a perfect split. Traffic: the
runtime sends a token once to each rank that holds any of its experts, so experts that are
often chosen together cost less when they share a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .stats import LayerStats

__all__ = ["LayerDemand", "layer_metrics", "ID_BYTES"]

ID_BYTES = 4  # the runtime sends each slot's local expert id as int32


@dataclass
class LayerDemand:
    """Expected routing of one layer: `load[e]` assignments to expert e, `coactivation[i, j]`
    tokens choosing both i and j (zero diagonal), over `tokens` tokens, `top_k` slots each."""

    load: np.ndarray
    coactivation: np.ndarray
    tokens: float
    top_k: int

    @classmethod
    def from_stats(cls, stats: LayerStats, top_k: int) -> "LayerDemand":
        """Measured demand; a layer that saw no token is treated as uniform."""
        if stats.tokens == 0 or sum(stats.expert_tokens) == 0:
            return cls.uniform(len(stats.expert_tokens), top_k)
        co = np.array(stats.coactivation, dtype=np.float64)
        np.fill_diagonal(co, 0.0)
        return cls(np.array(stats.expert_tokens, dtype=np.float64), co, float(stats.tokens), top_k)

    @classmethod
    def uniform(cls, num_experts: int, top_k: int) -> "LayerDemand":
        """The expectation without statistics: every expert and every pair equally likely."""
        e, k = num_experts, min(top_k, num_experts)
        co = np.full((e, e), k * (k - 1) / (e * (e - 1)))
        np.fill_diagonal(co, 0.0)
        return cls(np.full(e, k / e), co, 1.0, top_k)

    def graph(self) -> nx.Graph:
        """The co-activation graph: a node per expert (attribute `load`), an edge per pair of
        experts chosen together (attribute `weight`: tokens that chose both)."""
        g = nx.Graph()
        g.add_nodes_from((e, {"load": float(v)}) for e, v in enumerate(self.load))
        i, j = np.nonzero(np.triu(self.coactivation, 1))
        g.add_weighted_edges_from((int(a), int(b), float(self.coactivation[a, b])) for a, b in zip(i, j))
        return g


def layer_metrics(ranks: list[int], demand: LayerDemand, world_size: int, hidden_size: int, element_size: int) -> dict:
    """Per-rank load share, imbalance (max/mean), the share of co-activation kept on one rank,
    ranks a token is sent to, and expected all-to-all bytes per token for `ranks`."""
    n = world_size
    rank_load = np.zeros(n)
    np.add.at(rank_load, np.asarray(ranks), demand.load)
    total = float(demand.load.sum())
    g = demand.graph()
    parts = [[e for e, r in enumerate(ranks) if r == rank] for rank in range(n)]
    weight = g.size(weight="weight")
    kept = sum(g.subgraph(p).size(weight="weight") for p in parts)
    # Distinct ranks per token = assignments minus pairs that share a rank (exact for top-2).
    fanout = max(1.0, float(total - kept) / demand.tokens) if demand.tokens else 0.0
    remote = fanout * (n - 1) / n  # a token starts on a random rank; its own rank costs nothing
    slots = demand.top_k
    per_row = (2 * hidden_size + slots) * element_size + slots * ID_BYTES
    return {
        "load_per_rank": [round(float(x) / total, 6) for x in rank_load] if total else [0.0] * n,
        "imbalance": round(float(rank_load.max() / (total / n)), 6) if total else 1.0,
        "coactivation_kept": round(float(kept / weight), 6) if weight else 1.0,
        "ranks_per_token": round(fanout, 6),
        "a2a_bytes_per_token": round(float(remote * per_row), 3),
    }
