"""Router statistics: how each MoE layer used its experts.

Computed from what every `Router` keeps of its last forward (`Router.last_forward`), after the
forward and only when asked, so inference pays nothing for them. The routers of the Hugging Face
MoE classes (Mixtral, Qwen-MoE, Switch) keep theirs once `track_routers` has run (`sparsify.load`
and `RouterStats` run it); a layer is then named by the module that holds the router. `RoutingTotals` adds them up over
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
from typing import Callable

import torch
import torch.nn as nn

from ..kernels.reference import expert_counts
from ..moe import Router, SparseMoE

__all__ = ["router_stats", "RoutingTotals", "track_routers", "PREFIX"]

PREFIX = "router/"

# Per forward and layer, one vector: [load counts (E) | assignments, dropped, dropped-of,
# entropy sum, z sum, tokens, balancing loss, forwards]. Sums of these are the totals.
_TAIL = ("assignments", "dropped", "dropped_of", "entropy", "z", "tokens", "balancing", "forwards")

# transformers' routers in the MoE formats sparsify writes: Mixtral's and Qwen-MoE's return
# (logits [T, E], top-k weights, top-k experts [T, k]); Switch's returns (one-hot experts [..., E]
# with the assignments over capacity zeroed, top probability [..., 1], logits [..., E]).
_HF_TOPK_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter")
_HF_SWITCH_ROUTER = "SwitchTransformersTop1Router"
_TRACE = "_sparsify_last_forward"


def _vector(logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, dropped: torch.Tensor,
            dropped_of: float, tokens: int) -> torch.Tensor:
    """One forward's vector (see `_TAIL`) from its logits and probabilities [T, E], the kept
    assignments per expert, and how many of `dropped_of` were dropped."""
    logits, probs = logits.detach().float(), probs.detach().float()
    pairs = counts.sum()
    # the Switch balancing loss E * sum_i f_i P_i, as the router computes it for its aux loss
    balancing = counts.numel() * torch.sum(counts / pairs.clamp(min=1.0) * probs.mean(dim=0)) if tokens else pairs * 0
    # constants made on the device (new_full), not copied from the host: no synchronisation
    return torch.cat([counts, torch.stack([
        pairs, dropped.float(), counts.new_full((), float(dropped_of)),
        torch.special.entr(probs).sum(), torch.logsumexp(logits, dim=-1).square().sum(),
        counts.new_full((), float(tokens)), balancing, counts.new_ones(()),
    ])])


def _native_vector(router: Router) -> torch.Tensor:
    last, cfg = router.last_forward, router.config
    routing, t = last.routing, last.tokens
    counts = expert_counts(routing.expert_idx, cfg.num_experts, torch.float32)
    if cfg.router == "expert-choice":
        chosen = torch.zeros(t, device=counts.device).index_add_(
            0, routing.token_idx, torch.ones_like(routing.token_idx, dtype=torch.float32))
        dropped, dropped_of = (chosen == 0).sum(), t
    else:
        dropped, dropped_of = t * cfg.top_k - counts.sum(), t * cfg.top_k
    return _vector(last.logits, last.probs, counts, dropped, dropped_of, t)


def _hf_vector(kind: str, output: tuple) -> torch.Tensor:
    if kind == _HF_SWITCH_ROUTER:  # its second output is each token's top probability only
        chosen, logits = (output[i].reshape(-1, output[i].shape[-1]) for i in (0, 2))
        counts = chosen.float().sum(dim=0)
        tokens = chosen.shape[0]
        return _vector(logits, logits.float().softmax(dim=-1), counts, tokens - counts.sum(), tokens, tokens)
    logits, _, experts = output
    logits = logits.reshape(-1, logits.shape[-1])
    counts = expert_counts(experts.reshape(-1), logits.shape[-1], torch.float32)
    return _vector(logits, logits.float().softmax(dim=-1), counts, counts.sum() * 0, experts.numel(), logits.shape[0])


class _HFForward:
    """What a transformers router returned in its last forward (kept by `track_routers`)."""

    def __init__(self, kind: str, output: tuple) -> None:
        self.kind, self.output = kind, output


def _keep_output(module: nn.Module, args: tuple, output: tuple) -> None:
    # References only: nothing is computed until the statistics are read.
    object.__setattr__(module, _TRACE, _HFForward(type(module).__name__, output))


def track_routers(model: nn.Module) -> nn.Module:
    """Make the routers of a Hugging Face MoE model (Mixtral, Qwen-MoE, Switch) keep their last
    forward's output, as sparsify's own routers do, for the statistics. Idempotent; returns `model`."""
    for m in model.modules():
        kind = type(m).__name__
        if (kind in _HF_TOPK_ROUTERS or kind == _HF_SWITCH_ROUTER) and not hasattr(m, _TRACE):
            object.__setattr__(m, _TRACE, None)
            m.register_forward_hook(_keep_output)
    return model


def _layers(model: nn.Module) -> dict[str, tuple[object, Callable[[], torch.Tensor]]]:
    """MoE layer name -> (its last forward, how to make its vector), for layers that ran."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE) and m.router.last_forward is not None:
            out[name] = (m.router.last_forward, lambda r=m.router: _native_vector(r))
        elif getattr(m, _TRACE, None) is not None:
            last = getattr(m, _TRACE)
            out[name.rsplit(".", 1)[0]] = (last, lambda f=last: _hf_vector(f.kind, f.output))
    return out


class RoutingTotals:
    """Router statistics summed over forwards: `add(model)` after each forward (it reads the
    routers' last forward; a forward already added is not added twice), `summary()` to read."""

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._seen: dict[str, weakref.ref] = {}

    def add(self, model: nn.Module) -> None:
        """Add the last forward of each of `model`'s routers (on the device; nothing waits)."""
        with torch.no_grad():
            for name, (last, vector_of) in _layers(model).items():
                seen = self._seen.get(name)
                if seen is not None and seen() is last:
                    continue
                vector = vector_of()
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
