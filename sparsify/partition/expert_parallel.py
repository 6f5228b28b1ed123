"""`ExpertParallelMoE`: an MoE layer that holds only its rank's experts.

Each rank runs the whole model on its own batch; the dense parts (attention, embeddings, the
router) are replicated, and each MoE layer exchanges tokens with the ranks that hold their
experts (see `dispatch.py`). Outputs equal those the single-process model gives for the same
batch. Gradients: a replicated parameter's gradient is this rank's batch's, as in data
parallelism; an expert's gradient sums over the batches of all ranks, because every rank's
tokens reach it. `sync_gradients` turns both into the gradient of the mean loss over ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OptionError, PlanError
from ..moe import Experts, Router, SparseMoE
from .dispatch import exchange_and_compute
from .placement import ExpertPlacement

__all__ = [
    "ExpertParallelMoE",
    "expert_parallel",
    "expert_parallel_layer",
    "replace_moe_layers",
    "local_experts_like",
    "resolve_group",
    "sync_gradients",
]


def resolve_group(group: Any = None) -> dist.ProcessGroup:
    """The process group to run on: a `ProcessGroup`, a 1-D `DeviceMesh`, or None (the default
    group, which must be initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        raise OptionError("expert parallelism needs torch.distributed; call torch.distributed.init_process_group "
                          "first (torchrun sets up its environment)")
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise OptionError(f"pass a 1-D DeviceMesh for the expert-parallel dimension (e.g. mesh['ep']), got {group.ndim}-D")
        return group.get_group()
    return group


def local_experts_like(experts: Experts, count: int, device: torch.device | str | None = None) -> Experts:
    """An empty `Experts` with `experts`' shapes and options but `count` experts."""
    bias = tuple(getattr(experts, f"b{i}") is not None for i in (1, 2, 3))
    return Experts(count, experts.hidden_size, experts.intermediate_size, form=experts.form,
                   activation=experts.activation, bias=bias, dropout=experts.dropout,
                   dtype=experts.w1.dtype, device=device if device is not None else experts.w1.device)


class ExpertParallelMoE(SparseMoE):
    """A `SparseMoE` whose `experts` are only this rank's, `global_ids[i]` being the layer's
    expert number of local expert i. `expert_rank[e]` is the rank that holds expert e."""

    def __init__(
        self,
        router: Router,
        experts: Experts,
        global_ids: Sequence[int],
        expert_rank: Sequence[int],
        group: dist.ProcessGroup,
        out_dropout: float = 0.0,
        backend: str = "reference",
        shared: nn.Module | None = None,
    ):
        super().__init__(router, experts, out_dropout=out_dropout, backend=backend, shared=shared)
        self.group = group
        self.rank = dist.get_rank(group)
        self.global_ids = list(global_ids)
        ranks = torch.tensor(list(expert_rank), dtype=torch.long)
        local = torch.zeros_like(ranks)
        for r in ranks.unique().tolist():  # position of each expert among its rank's experts
            mine = (ranks == r).nonzero().flatten()
            local[mine] = torch.arange(mine.numel())
        self.register_buffer("expert_rank", ranks, persistent=False)
        self.register_buffer("expert_local", local, persistent=False)
        most = int(torch.bincount(ranks).max())
        # A token can meet at most top_k of a rank's experts (expert choice: all of them).
        self.slots = most if self.config.router == "expert-choice" else min(self.config.top_k, most)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        r = self.router(x)
        y = exchange_and_compute(x, r.token_idx, r.expert_idx, r.weight, self.expert_rank.to(x.device),
                                 self.expert_local.to(x.device), self.slots, self.experts, self.group, self.backend)
        if self.shared is not None:  # replicated on every rank, like the router
            y = y + self.shared(x)
        if self.out_dropout > 0.0 and self.training:
            y = F.dropout(y, self.out_dropout, training=True)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, experts={self.global_ids}"


@torch.no_grad()
def expert_parallel_layer(moe: SparseMoE, ranks: Sequence[int], group: dist.ProcessGroup, copy_weights: bool = True) -> ExpertParallelMoE:
    """The `ExpertParallelMoE` for this rank of `moe`, whose expert e goes to rank `ranks[e]`;
    with `copy_weights` its experts are copied out of `moe`'s, else left empty on `moe`'s device."""
    ids = [e for e, r in enumerate(ranks) if r == dist.get_rank(group)]
    local = local_experts_like(moe.experts, len(ids))
    if copy_weights:
        for name, param in local.named_parameters():
            param.copy_(getattr(moe.experts, name)[ids])
    ep = ExpertParallelMoE(moe.router, local, ids, ranks, group, moe.out_dropout, moe.backend, shared=moe.shared)
    return ep.train(moe.training)


def replace_moe_layers(model: nn.Module, placement: ExpertPlacement, group: dist.ProcessGroup, copy_weights: bool = True) -> nn.Module:
    """Replace each `SparseMoE` that `placement` names by its `expert_parallel_layer`, in place."""
    for path, ranks in placement.layers.items():
        try:
            moe = model.get_submodule(path)
        except AttributeError:
            moe = None
        if not isinstance(moe, SparseMoE) or isinstance(moe, ExpertParallelMoE):
            raise PlanError(f"the placement names '{path}', which is not an MoE layer of this model")
        if moe.experts.num_experts != placement.num_experts:
            raise PlanError(f"layer '{path}' has {moe.experts.num_experts} experts, the placement places {placement.num_experts}")
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, expert_parallel_layer(moe, ranks, group, copy_weights))
    model.sparsify_placement = placement
    return model


def expert_parallel(model: nn.Module, placement: ExpertPlacement | str | dict, group: Any = None) -> nn.Module:
    """Turn the `SparseMoE` layers of an in-memory `model` into `ExpertParallelMoE` layers that
    keep only this rank's experts (copied out of the full ones), in place; returns `model`."""
    placement = ExpertPlacement.load(placement)
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    plan = getattr(model, "sparsify_plan", None)
    if plan is not None:
        placement.check_matches(plan, n)
    elif placement.world_size != n:
        raise PlanError(f"the placement is for {placement.world_size} ranks but the process group has {n}; "
                        f"run sparsify partition --world-size {n}")
    return replace_moe_layers(model, placement, pg)


def sync_gradients(model: nn.Module, group: Any = None) -> None:
    """Make every gradient that of the mean of the ranks' losses: replicated parameters are
    averaged over ranks (all-reduce), local experts' gradients (already summed over all ranks'
    tokens) are divided by the world size. Call after `backward()`, before the optimizer."""
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    expert_params = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pg)
        flat /= n
        offset = 0
        for p in replicated:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype, copy=True)
            offset += p.numel()
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):
            for p in m.experts.parameters():
                if p.grad is not None:
                    p.grad /= n
