"""Export-time stand-ins: each MoE layer becomes one custom op that ONNX export translates.

`SparseMoE` dispatches with data-dependent loops (argsort, bincount, per-expert segments) that
torch.export cannot trace with symbolic token counts. During export, `export_friendly(model)`
swaps every MoE layer for `ExportMoE`, which calls the custom op `sparsify::moe_ffn` on the same
tensors; `TRANSLATIONS` tells `torch.onnx.export` to write that op as the standard-ops MoE of
`sparsify.onnx.moe_graph`. The swap is undone on exit, so the caller's model is unchanged.

Hugging Face Mixtral and Qwen-MoE blocks (the HF formats sparsify writes) are swapped the same
way, so native and HF-format upcycled models export to the same graph.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..activations import identify_activation
from ..errors import OptionError
from ..moe import Experts, MoEConfig, Router, SparseMoE

__all__ = ["ExportMoE", "export_friendly", "TRANSLATIONS", "moe_ffn_op"]


@torch.library.custom_op("sparsify::moe_ffn", mutates_args=())
def moe_ffn_op(
    x: torch.Tensor,
    router: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: Optional[torch.Tensor],
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    b3: Optional[torch.Tensor],
    top_k: int,
    router_kind: str,
    normalize: bool,
    capacity_factor: Optional[float],
    activation: str,
    router_dtype: str,
) -> torch.Tensor:
    """An MoE layer as one op (weights [E, out, in] as in `Experts`); eager runs `SparseMoE`."""
    e, i, h = w1.shape
    config = MoEConfig(num_experts=e, top_k=top_k, router=router_kind, normalize=normalize,
                       capacity_factor=capacity_factor, router_dtype=router_dtype)
    form = "dense" if w3 is None else "gated"
    experts = Experts(e, h, i, form=form, activation=activation, device="meta")
    for name, t in dict(w1=w1, w2=w2, w3=w3, b1=b1, b2=b2, b3=b3).items():
        setattr(experts, name, None if t is None else nn.Parameter(t, requires_grad=False))
    gate = Router(h, config)
    gate.weight = nn.Parameter(router, requires_grad=False)
    return SparseMoE(gate, experts).eval()(x).clone()


@moe_ffn_op.register_fake
def _(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(x)


def _translate(x, router, w1, w2, w3, b1, b2, b3, top_k, router_kind, normalize, capacity_factor,
               activation, router_dtype):
    """`sparsify::moe_ffn` in ONNX: the standard-ops MoE, weights moved to MatMul layout (the
    transposes are constant-folded into the initializers)."""
    from onnxscript import opset18 as op

    from .builder import const
    from .moe_graph import MoEGraphSpec, MoEWeights, emit_moe

    e, i, h = (int(d) for d in w1.shape)
    config = MoEConfig(num_experts=e, top_k=top_k, router=router_kind, normalize=normalize,
                       capacity_factor=capacity_factor, router_dtype=router_dtype)
    spec = MoEGraphSpec.from_config(config, activation, "dense" if w3 is None else "gated", h, x.dtype)

    def t(v):
        return None if v is None else op.Transpose(v, perm=[0, 2, 1])

    def u(v):
        return None if v is None else op.Unsqueeze(v, const(op, [1], "int64"))

    weights = MoEWeights(op.Transpose(router, perm=[1, 0]), t(w1), t(w2), t(w3), u(b1), u(b2), u(b3))
    return emit_moe(op, x, spec, weights)


TRANSLATIONS = {torch.ops.sparsify.moe_ffn.default: _translate}


class ExportMoE(nn.Module):
    """Stands in for an MoE layer during export: the same parameters under the same names,
    computed by the custom op. Build it with `from_sparse_moe` or `from_mixtral`."""

    def __init__(self, config: MoEConfig, activation: str, tensors) -> None:
        super().__init__()
        self.config, self.activation, self._tensors = config, activation, tensors

    @classmethod
    def from_sparse_moe(cls, moe: SparseMoE) -> "ExportMoE":
        """The stand-in of a sparsify `SparseMoE` (its shared expert, if any, stays a module of
        plain ops beside the custom op)."""
        e = moe.experts
        self = cls(moe.config, e.activation, lambda: (moe.router.weight, e.w1, e.w2, e.w3, e.b1, e.b2, e.b3))
        self.router, self.experts = moe.router, moe.experts  # keep parameter names
        if moe.shared is not None:  # the always-on shared expert, added with weight 1 as SparseMoE does
            self.shared = moe.shared
        return self

    @classmethod
    def from_hf_block(cls, block: nn.Module) -> "ExportMoE":
        """The stand-in of a transformers Mixtral, Qwen2-MoE or Qwen3-MoE block: softmax, top-k,
        renormalised unless `norm_topk_prob` is False; SwiGLU experts with gate and up stacked
        in `gate_up_proj` [E, 2I, H]; Qwen2-MoE's sigmoid-gated shared expert added on top."""
        experts, gate = block.experts, block.gate
        activation = identify_activation(experts.act_fn)
        if activation is None:
            raise ValueError(f"unrecognised expert activation {experts.act_fn!r}")
        normalize = bool(getattr(gate, "norm_topk_prob", True))
        config = MoEConfig(num_experts=experts.num_experts, top_k=gate.top_k, router="topk", normalize=normalize)
        i = experts.intermediate_dim

        def tensors():
            gu = experts.gate_up_proj
            return gate.weight, gu[:, :i], experts.down_proj, gu[:, i:], None, None, None

        self = cls(config, activation, tensors)
        self.gate, self.experts = gate, experts
        if getattr(block, "shared_expert", None) is not None:
            self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        return self

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c = self.config
        out = moe_ffn_op(hidden_states, *self._tensors(), c.top_k, c.router, c.normalize,
                         c.capacity_factor, self.activation, c.router_dtype)
        shared = getattr(self, "shared_expert", None)
        if shared is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared(hidden_states)
        if getattr(self, "shared", None) is not None:
            out = out + self.shared(hidden_states)
        return out


# transformers MoE blocks with the routing and experts `from_hf_block` reproduces
_HF_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
# ... and those it does not, with the reason
_UNSUPPORTED = {
    "SwitchTransformersSparseMLP": "SwitchTransformers routing drops tokens past a fixed per-sequence capacity, "
    "which the exported MoE does not model; export the native upcycled directory instead",
}


def _stand_in(module: nn.Module) -> ExportMoE | None:
    if isinstance(module, SparseMoE):
        return ExportMoE.from_sparse_moe(module)
    kind = type(module).__name__
    if kind in _HF_BLOCKS:
        return ExportMoE.from_hf_block(module)
    if kind in _UNSUPPORTED:
        raise OptionError(f"cannot export {kind}: {_UNSUPPORTED[kind]}")
    return None


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[list[str]]:
    """Swap every MoE layer of `model` for its `ExportMoE` stand-in; yields the swapped module
    paths and restores the originals on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    paths: list[str] = []
    try:
        for path, module in list(model.named_modules()):
            new = _stand_in(module) if path else None  # the root cannot be swapped in place
            if new is None:
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, new)
            swapped.append((parent, name, module))
            paths.append(path)
        yield paths
    finally:
        for parent, name, module in reversed(swapped):
            setattr(parent, name, module)
