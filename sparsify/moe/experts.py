"""`Experts`: the routed experts' FFN weights stacked [E, out, in] so one kernel serves them all;
`SharedExpert`: the always-on expert beside them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..activations import get_activation

__all__ = ["Experts", "SharedExpert"]


class Experts(nn.Module):
    """E copies of one FFN in canonical form.

    dense: y = act(x @ w1[e].T + b1[e]) @ w2[e].T + b2[e]
    gated: y = (act(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        form: str = "dense",
        activation: str = "relu",
        bias: tuple[bool, bool, bool] = (False, False, False),
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if form not in ("dense", "gated"):
            raise ValueError(f"form must be 'dense' or 'gated', got {form!r}")
        e, h, i = num_experts, hidden_size, intermediate_size
        kw = {"dtype": dtype, "device": device}
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.form, self.activation, self.dropout = form, activation, dropout
        self.w1 = nn.Parameter(torch.empty(e, i, h, **kw))
        self.w2 = nn.Parameter(torch.empty(e, h, i, **kw))
        self.w3 = nn.Parameter(torch.empty(e, i, h, **kw)) if form == "gated" else None
        self.b1 = nn.Parameter(torch.empty(e, i, **kw)) if bias[0] else None
        self.b2 = nn.Parameter(torch.empty(e, h, **kw)) if bias[1] else None
        self.b3 = nn.Parameter(torch.empty(e, i, **kw)) if bias[2] and form == "gated" else None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, form={self.form}, activation={self.activation}"
        )


class SharedExpert(nn.Module):
    """An always-on expert every token passes through (DeepSeekMoE, Qwen1.5-MoE), beside the
    routed ones: one FFN in canonical form, weights [out, in], computed densely."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        form: str = "dense",
        activation: str = "relu",
        bias: tuple[bool, bool, bool] = (False, False, False),
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        h, i = hidden_size, intermediate_size
        kw = {"dtype": dtype, "device": device}
        self.hidden_size, self.intermediate_size = h, i
        self.form, self.activation, self.dropout = form, activation, dropout
        self.w1 = nn.Parameter(torch.empty(i, h, **kw))
        self.w2 = nn.Parameter(torch.empty(h, i, **kw))
        self.w3 = nn.Parameter(torch.empty(i, h, **kw)) if form == "gated" else None
        self.b1 = nn.Parameter(torch.empty(i, **kw)) if bias[0] else None
        self.b2 = nn.Parameter(torch.empty(h, **kw)) if bias[1] else None
        self.b3 = nn.Parameter(torch.empty(i, **kw)) if bias[2] and form == "gated" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = get_activation(self.activation)(F.linear(x, self.w1, self.b1))
        if self.w3 is not None:
            h = h * F.linear(x, self.w3, self.b3)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return F.linear(h, self.w2, self.b2)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, form={self.form}, activation={self.activation}"
