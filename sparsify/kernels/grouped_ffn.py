"""`grouped_ffn`: every expert's FFN over its contiguous segment of rows.

    y = grouped_ffn(x_sorted, counts, w1, w2, w3, b1, b2, b3, activation="silu", backend="cpu")

`x_sorted` [N, H] holds rows grouped by expert (`counts[e]` rows for expert e, in expert order,
as `permute` arranges them). Weights are stacked [E, out, in]: w1 [E, I, H], w2 [E, H, I], w3
[E, I, H] for the gated form (`act(x W1^T) * (x W3^T)`), None for the dense form; biases [E, out]
or None. `dropout` applies to the hidden activations when `training`. Returns [N, H], row for
row. Differentiable in every backend.
"""

from __future__ import annotations

import torch

from .dispatch import check_backend, get_backend

__all__ = ["grouped_ffn"]


def grouped_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    b3: torch.Tensor | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "reference",
) -> torch.Tensor:
    """Each expert's FFN on its segment of the grouped rows `x`, computed by `backend`."""
    name = check_backend(backend, x.device, w1.dtype, activation)
    return get_backend(name).grouped_ffn(
        x, counts, w1, w2, w3, b1, b2, b3, activation=activation, dropout=dropout, training=training
    )
