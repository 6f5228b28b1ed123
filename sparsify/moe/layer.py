"""`SparseMoE`: route, dispatch, compute, combine. A drop-in for the FFN module it replaces."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import moe_ffn
from .config import MoEConfig
from .experts import Experts, SharedExpert
from .router import Router

__all__ = ["SparseMoE", "aux_losses"]


class SparseMoE(nn.Module):
    """Router plus stacked experts, taking and returning the hidden states [..., H].

    `backend` names the kernel backend (see `sparsify.kernels`). `out_dropout` is the dropout
    the replaced module applied to its output (GPT-2's MLP), kept for training fidelity.
    `shared`, when given, is an always-on expert whose output is added for every token.
    """

    def __init__(self, router: Router, experts: Experts, out_dropout: float = 0.0, backend: str = "reference",
                 shared: SharedExpert | None = None):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared
        self.out_dropout = out_dropout
        self.backend = backend

    @property
    def config(self) -> MoEConfig:
        """The routing configuration."""
        return self.router.config

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        r = self.router(x)
        y = moe_ffn(x, r.token_idx, r.expert_idx, r.weight, self.experts, backend=self.backend)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.out_dropout > 0.0 and self.training:
            y = F.dropout(y, self.out_dropout, training=True)
        return y.reshape(shape)

    def aux_loss(self) -> torch.Tensor | None:
        """This layer's weighted auxiliary loss from its last forward (None before any)."""
        aux = self.router.aux
        if not aux:
            return None
        cfg = self.config
        return cfg.aux_loss_coef * aux["load_balancing"] + cfg.z_loss_coef * aux["z_loss"]

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, top_k={c.top_k}, normalize={c.normalize}, backend={self.backend}"


def aux_losses(model: nn.Module) -> torch.Tensor:
    """Weighted sum of every MoE layer's balancing and z losses from the last forward (a scalar
    with grad); zero when the model has no MoE layer or has not run yet."""
    total = None
    for m in model.modules():
        if isinstance(m, SparseMoE):
            loss = m.aux_loss()
            if loss is not None:
                total = loss if total is None else total + loss
    if total is None:
        return torch.zeros((), requires_grad=False)
    return total
