"""Router statistics: how each MoE layer used its experts.

Computed from what every `Router` keeps of its last forward (`Router.last_forward`), after the
forward and only when asked, so inference pays nothing for them. `RoutingTotals` adds them up over
several forwards on the device (no host synchronisation per step) and is read once, when logged.

Keys, per MoE layer (its module path, e.g. `model.layers.1.mlp`):

- `router/LAYER/load/E`: share of the layer's (token, expert) assignments that went to expert E
  (1/num_experts each when balanced);
- `router/LAYER/dropped`: share of assignments dropped because an expert was over its capacity
  (token choice with a capacity factor), or, for expert choice, share of tokens no expert chose;
  0 when dropless;
- `router/LAYER/entropy`: mean entropy of a token's router distribution, in nats (ln E at most);
- `router/LAYER/z_loss`: the ST-MoE z-loss, mean of logsumexp(logits)^2;
- `router/LAYER/balancing_loss`: the Switch balancing loss E * sum_i f_i P_i (1 when balanced).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..kernels.reference import expert_counts
from ..moe import Router, SparseMoE

__all__ = ["router_stats", "RoutingTotals", "PREFIX"]

PREFIX = "router/"

# Per forward and layer, one vector: [load counts (E) | assignments, dropped, dropped-of,
# entropy sum, z sum, tokens, balancing loss, forwards]. Sums of these are the totals.
_TAIL = ("assignments", "dropped", "dropped_of", "entropy", "z", "tokens", "balancing", "forwards")


def _layer_vector(router: Router) -> torch.Tensor | None:
    last = router.last_forward
    if last is None:
        return None
    cfg = router.config
    e, t = cfg.num_experts, last.tokens
    logits, probs = last.logits.detach(), last.probs.detach()
    routing = last.routing
    counts = expert_counts(routing.expert_idx, e, torch.float32)
    pairs = torch.tensor(float(routing.expert_idx.numel()), device=counts.device)
    if cfg.router == "expert-choice":
        chosen = torch.zeros(t, device=counts.device).index_add_(
            0, routing.token_idx, torch.ones_like(routing.token_idx, dtype=torch.float32))
        dropped, dropped_of = (chosen == 0).sum().float(), float(t)
    else:
        dropped, dropped_of = t * cfg.top_k - pairs, float(t * cfg.top_k)
    losses = Router.losses(logits, probs, routing.expert_idx)
    tail = torch.stack([
        pairs, dropped, torch.tensor(dropped_of, device=counts.device),
        torch.special.entr(probs).sum().float(), torch.logsumexp(logits, dim=-1).square().sum().float(),
        torch.tensor(float(t), device=counts.device), losses["load_balancing"].float(),
        torch.ones((), device=counts.device),
    ])
    return torch.cat([counts, tail])


def _routers(model: nn.Module) -> dict[str, Router]:
    return {name: m.router for name, m in model.named_modules() if isinstance(m, SparseMoE)}


class RoutingTotals:
    """Router statistics summed over forwards: `add(model)` after each forward (it reads the
    routers' last forward; a forward already added is not added twice), `summary()` to read."""

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._seen: dict[str, weakref.ref] = {}

    def add(self, model: nn.Module) -> None:
        """Add the last forward of each of `model`'s routers (on the device; nothing waits)."""
        with torch.no_grad():
            for name, router in _routers(model).items():
                last = router.last_forward
                seen = self._seen.get(name)
                if last is None or (seen is not None and seen() is last):
                    continue
                vector = _layer_vector(router)
                self._seen[name] = weakref.ref(last)
                self._totals[name] = vector if name not in self._totals else self._totals[name] + vector

    def __bool__(self) -> bool:
        return bool(self._totals)

    def reset(self) -> None:
        """Forget everything added (the last forwards stay marked as seen)."""
        self._totals = {}

    def summary(self) -> dict[str, float]:
        """The statistics (see the module docstring) over every forward added; one device sync."""
        if not self._totals:
            return {}
        names = list(self._totals)
        values = torch.cat([self._totals[n] for n in names]).tolist()
        out: dict[str, float] = {}
        at = 0
        for name in names:
            size = self._totals[name].numel()
            vector = values[at:at + size]
            at += size
            counts, tail = vector[:size - len(_TAIL)], dict(zip(_TAIL, vector[size - len(_TAIL):]))
            key = f"{PREFIX}{name}/"
            for e, c in enumerate(counts):
                out[f"{key}load/{e}"] = c / max(tail["assignments"], 1.0)
            out[f"{key}dropped"] = tail["dropped"] / max(tail["dropped_of"], 1.0)
            out[f"{key}entropy"] = tail["entropy"] / max(tail["tokens"], 1.0)
            out[f"{key}z_loss"] = tail["z"] / max(tail["tokens"], 1.0)
            out[f"{key}balancing_loss"] = tail["balancing"] / max(tail["forwards"], 1.0)
        return out


def router_stats(model: nn.Module) -> dict[str, float]:
    """Statistics of every MoE layer's routing in `model`'s last forward, as a flat dict of
    floats keyed `router/LAYER/...` (see this module's docstring); {} before any forward."""
    totals = RoutingTotals()
    totals.add(model)
    return totals.summary()
