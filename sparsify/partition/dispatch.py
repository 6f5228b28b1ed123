"""Token exchange for expert parallelism: tokens to the ranks of their experts, results back.

Each token is sent once to each rank that holds any of its chosen experts (not once per
expert), as one row: its hidden state, then its routing weights for that rank's experts in
`slots` columns; a second (integer, non-differentiable) exchange carries the local expert id
of each slot (-1 when unused). The receiving rank runs its experts on the rows with the kernel
backend, sums each row's weighted expert outputs, and sends one row back per row received.

Everything travels with `all_to_all_single`, whose uneven splits work on NCCL and gloo; the
two float exchanges go through `all_to_all_single_autograd`, so gradients flow back to the
tokens, the routing weights and the experts. Every rank must call this the same number of
times (even with no tokens), as with any collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..kernels import moe_ffn

__all__ = ["exchange_and_compute"]


def _slots_of(row_of_pair: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Position of each pair among the pairs of its row (0, 1, ...), in pair order."""
    order = torch.argsort(row_of_pair, stable=True)
    per_row = torch.bincount(row_of_pair, minlength=num_rows)
    start = torch.cumsum(per_row, 0) - per_row
    slot = torch.empty_like(row_of_pair)
    slot[order] = torch.arange(row_of_pair.numel(), device=row_of_pair.device) - start[row_of_pair[order]]
    return slot


def exchange_and_compute(
    x: torch.Tensor,
    token_idx: torch.Tensor,
    expert_idx: torch.Tensor,
    weight: torch.Tensor,
    expert_rank: torch.Tensor,
    expert_local: torch.Tensor,
    slots: int,
    experts: torch.nn.Module,
    group: dist.ProcessGroup,
    backend: str = "reference",
) -> torch.Tensor:
    """The MoE output [T, H] for rows `x` [T, H] routed by (token, expert, weight) pairs, with
    expert e living on rank `expert_rank[e]` as its local expert `expert_local[e]`, and
    `experts` this rank's local experts."""
    n = dist.get_world_size(group)
    t, h = x.shape
    dest = expert_rank[expert_idx]
    # One row per (destination rank, token), ordered by rank: the send buffer's layout.
    rows, row_of_pair = torch.unique(dest * max(t, 1) + token_idx, sorted=True, return_inverse=True)
    row_token = rows % max(t, 1)
    send_rows = torch.bincount(rows // max(t, 1), minlength=n)
    slot = _slots_of(row_of_pair, rows.numel())
    weights = x.new_zeros(rows.numel(), slots).index_put((row_of_pair, slot), weight.to(x.dtype))
    ids = torch.full((rows.numel(), slots), -1, dtype=torch.int32, device=x.device)
    ids = ids.index_put((row_of_pair, slot), expert_local[expert_idx].to(torch.int32))
    send = torch.cat([x[row_token], weights], dim=1)

    recv_rows = torch.empty_like(send_rows)
    dist.all_to_all_single(recv_rows, send_rows, group=group)
    s, r = send_rows.tolist(), recv_rows.tolist()
    recv = all_to_all_single_autograd(send, r, s, group)
    recv_ids = ids.new_empty((sum(r), slots))
    dist.all_to_all_single(recv_ids, ids, r, s, group=group)

    row, col = (recv_ids >= 0).nonzero(as_tuple=True)
    y = moe_ffn(recv[:, :h], row, recv_ids[row, col].long(), recv[:, h:][row, col], experts, backend=backend)
    if row.numel() == 0 and torch.is_grad_enabled():
        # A rank that received no pair must still take part in the backward all-to-alls, which
        # autograd runs only for tensors in the graph, and its experts should get zero
        # gradients (as the rows of an unused expert do in one process), not none.
        y = y + sum((p.sum() for p in experts.parameters()), recv.sum()) * 0
    back = all_to_all_single_autograd(y, s, r, group)
    return x.new_zeros(t, h).index_add(0, row_token, back.to(x.dtype))
