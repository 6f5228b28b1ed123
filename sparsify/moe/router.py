"""`Router`: token-to-expert assignment in float32, with the balancing and z losses recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.reference import expert_counts
from .config import MoEConfig

__all__ = ["Router", "Routing", "RouterForward"]


@dataclass
class Routing:
    """Flat (token, expert, weight) pairs: pair p sends token `token_idx[p]` to `expert_idx[p]`."""

    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    weight: torch.Tensor


@dataclass
class RouterForward:
    """What one forward of a router saw and chose: logits and probabilities [T, E] (with grad in
    training) and the routing, over `tokens` tokens."""

    logits: torch.Tensor
    probs: torch.Tensor
    routing: Routing
    tokens: int


class Router(nn.Module):
    """A linear gate over the hidden state; `forward(x [T, H]) -> Routing`.

    After each forward, `aux` holds the layer's Switch load-balancing loss `E * sum_i f_i P_i`
    (f_i: share of assignments to expert i, P_i: mean router probability of expert i) and the
    ST-MoE z-loss `mean(logsumexp(logits)^2)`, both differentiable. They are computed when `aux`
    is first read after a forward, so inference that never reads them does not pay for them, and
    nothing in the forward waits for the GPU (no host synchronisation: the layer can be captured
    in a CUDA graph). `last_forward` keeps what they are computed from, which is also what the
    router statistics (`sparsify.router_stats`) read, on demand, after the forward.
    """

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        # The router weight stays float32 whatever the model's dtype (Switch Transformer, sec. 2.4).
        self.weight = nn.Parameter(torch.zeros(config.num_experts, hidden_size, dtype=torch.float32))
        self._last: RouterForward | None = None
        self._aux: dict[str, torch.Tensor] | None = None

    @property
    def aux(self) -> dict[str, torch.Tensor]:
        """{"load_balancing", "z_loss"} of the last forward; {} before any."""
        if self._aux is None:
            last = self._last
            self._aux = {} if last is None else self._losses(last.logits, last.probs, last.routing.expert_idx)
        return self._aux

    @property
    def last_forward(self) -> "RouterForward | None":
        """The logits, probabilities and routing of the last forward (None before any)."""
        return self._last

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.config
        dtype = getattr(torch, cfg.router_dtype)
        xr = x.to(dtype)
        if self.training and cfg.jitter > 0:
            xr = xr * torch.empty_like(xr).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        logits = F.linear(xr, self.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        if cfg.router == "expert-choice":
            routing = self._expert_choice(probs)
        else:
            routing = self._token_choice(probs)
        self._last, self._aux = RouterForward(logits, probs, routing, x.shape[0]), None
        return routing

    def _token_choice(self, probs: torch.Tensor) -> Routing:
        cfg = self.config
        t, e = probs.shape
        k = cfg.top_k
        weight, expert = probs.topk(k, dim=-1)  # [T, k]
        if cfg.router == "topk" and cfg.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        # Pairs in priority order: every token's first choice before any second choice (GShard).
        token_idx = torch.arange(t, device=probs.device).repeat(k)
        expert_idx = expert.t().reshape(-1)
        weight = weight.t().reshape(-1)
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * t * k / e)
            order = torch.argsort(expert_idx, stable=True)
            counts = expert_counts(expert_idx, e)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.empty_like(expert_idx)
            position[order] = torch.arange(expert_idx.numel(), device=probs.device) - starts[expert_idx[order]]
            keep = position < capacity
            token_idx, expert_idx, weight = token_idx[keep], expert_idx[keep], weight[keep]
        return Routing(token_idx, expert_idx, weight)

    def _expert_choice(self, probs: torch.Tensor) -> Routing:
        cfg = self.config
        t, e = probs.shape
        capacity = min(t, max(1, math.ceil(cfg.capacity_factor * t * cfg.top_k / e)))
        weight, token = probs.t().topk(capacity, dim=-1)  # [E, C]: each expert picks its tokens
        expert_idx = torch.arange(e, device=probs.device).repeat_interleave(capacity)
        return Routing(token.reshape(-1), expert_idx, weight.reshape(-1))

    @staticmethod
    def _losses(logits: torch.Tensor, probs: torch.Tensor, expert_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        e = probs.shape[-1]
        if probs.shape[0] == 0:
            zero = logits.sum() * 0.0
            return {"load_balancing": zero, "z_loss": zero}
        share = expert_counts(expert_idx, e, probs.dtype) / max(1, expert_idx.numel())
        balance = e * torch.sum(share * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return {"load_balancing": balance, "z_loss": z}
