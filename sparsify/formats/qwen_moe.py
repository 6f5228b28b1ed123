"""The Hugging Face Qwen-MoE formats: Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE.

Qwen-MoE is its dense sibling with the FFN of some layers replaced by a router (`mlp.gate`) and
gated SiLU experts (`mlp.experts.{e}.{gate,up,down}_proj`); the other layers keep the dense
`mlp.{gate,up,down}_proj`. Layer i is sparse when `(i + 1) % decoder_sparse_step == 0` and i is
not in `mlp_only_layers`, so any selection of layers can be expressed. Routing is softmax top-k,
renormalised or not (`norm_topk_prob`), without dropping: the plan's routing maps exactly.

Qwen2-MoE adds a shared expert gated by a sigmoid; an upcycled model has none, so it is written
with `shared_expert_intermediate_size = 0` (zero-size projections, whose output is exactly zero;
the gate is written as zeros so that nothing is left to random initialisation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..init import canonical_shape
from ..io.safetensors_io import OutputTensor
from ..plan import FFNSite, UpcyclePlan
from .base import OutputFormat
from .hf_common import (
    carried_config, check_ffn, check_layout, check_routing, check_shared, expert_tensors, layer_of, router_tensor, walk_tensors,
)
from .tensors import TensorSource

__all__ = ["QwenMoEFormat", "TARGETS", "sparse_step_layout"]

# source model_type -> (transformers config class, model class, fields read but not declared)
TARGETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "qwen2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", ()),
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("head_dim",)),
}


def sparse_step_layout(layers: int, sparse: set[int], every: int | None) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) making exactly the layers in `sparse` MoE layers.
    The plan's `every` is a sparse step (our j % every == every - 1 is Qwen's (i + 1) % step == 0);
    any other selection is step 1 with the remaining layers listed as dense."""
    if every and {i for i in range(layers) if (i + 1) % every == 0} == sparse:
        return every, []
    return 1, [i for i in range(layers) if i not in sparse]


class QwenMoEFormat(OutputFormat):
    """Hugging Face `Qwen2MoeForCausalLM` / `Qwen3MoeForCausalLM` from Qwen2 / Qwen3 sources."""

    name = "qwen2-moe"
    description = "Hugging Face Qwen2-MoE / Qwen3-MoE (Qwen2/Qwen3 sources; any layer selection, top-k)"

    def explain(self, plan: UpcyclePlan, config: Any) -> str | None:
        model_type = getattr(config, "model_type", None)
        if model_type not in TARGETS:
            return f"Qwen-MoE takes Qwen2 or Qwen3 sources (Qwen2-MoE, Qwen3-MoE), and this source is {model_type!r}"
        layer_types = getattr(config, "layer_types", None) or []
        if model_type == "qwen3" and len(set(layer_types)) > 1:
            return "this Qwen3 mixes sliding-window and full-attention layers, and Qwen3-MoE applies one window to all"
        if model_type == "qwen3":
            why = check_shared(plan, "Qwen3-MoE")
            if why:
                return why
        return (check_routing(plan, "Qwen-MoE")
                or check_ffn(plan.selected_sites, "gated", "silu", "Qwen-MoE experts are")
                or check_layout(plan.sites, "model.layers.{i}.mlp", f"{model_type.capitalize()}ForCausalLM"))

    def keeps_meaning(self, plan: UpcyclePlan, config: Any) -> str | None:
        if plan.moe.jitter > 0:
            return "Qwen-MoE has no router jitter, so the plan's training jitter would be dropped"
        return None

    def config_dict(self, plan: UpcyclePlan, config: Any) -> dict[str, Any]:
        import transformers

        config_cls, model_cls, extra = TARGETS[config.model_type]
        config_cls = getattr(transformers, config_cls)
        moe, sites = plan.moe, plan.selected_sites
        layer = plan.layer(sites[0])
        step, dense = sparse_step_layout(config.num_hidden_layers, {layer_of(s) for s in sites}, plan.selection.get("every"))
        kwargs = carried_config(config, config_cls, extra)
        kwargs.update(
            moe_intermediate_size=layer.expert_size(sites[0]),
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.normalize,
            decoder_sparse_step=step,
            mlp_only_layers=dense,
            router_aux_loss_coef=moe.aux_loss_coef,
            output_router_logits=False,
            architectures=[model_cls],
        )
        if config.model_type == "qwen2":
            kwargs["shared_expert_intermediate_size"] = layer.shared.size(sites[0]) if layer.shared else 0
        if config.model_type == "qwen3":
            # Qwen3 slides only from max_window_layers on; Qwen3-MoE slides in every layer or none
            kwargs["use_sliding_window"] = set(getattr(config, "layer_types", None) or []) == {"sliding_attention"}
        return config_cls(**kwargs).to_dict()

    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        qwen2 = model.config.model_type == "qwen2"

        def site_tensors(site: FFNSite) -> list[OutputTensor]:
            mlp = f"model.layers.{layer_of(site)}.mlp"
            names = {role: (lambda i, p=p: f"{mlp}.experts.{i}.{p}.weight") for role, p in _PROJ.items()}
            out = [router_tensor(f"{mlp}.gate.weight", site, plan, source), *expert_tensors(site, plan, source, names)]
            if qwen2:
                out.extend(_shared_expert(mlp, site, plan, source))
            return out

        return walk_tensors(model, plan, source, lambda name: name, site_tensors)


_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _shared_expert(mlp: str, site: FFNSite, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
    """Qwen2-MoE's shared expert and its gate. The block adds sigmoid(gate(x)) * shared(x): a gate
    of zeros makes that factor exactly 0.5, so the down projection is written doubled (exact in
    binary floating point) and the sum equals the plan's shared expert. Without one, zero-size
    projections, whose output is exactly zero."""
    h, dtype = site.hidden_size, source.expert_dtype(site, "w1")
    gate = OutputTensor(f"{mlp}.shared_expert_gate.weight", dtype, (1, h), lambda: [torch.zeros(1, h, dtype=dtype)])
    shared = plan.layer(site).shared
    if shared is None:
        shapes = {"w1": (0, h), "w3": (0, h), "w2": (h, 0)}
        return [*(OutputTensor(f"{mlp}.shared_expert.{p}.weight", dtype, shapes[r],
                               lambda s=shapes[r]: [torch.zeros(s, dtype=dtype)]) for r, p in _PROJ.items()), gate]
    size = shared.size(site)

    def produce(role: str):
        value = source.expert(site, role, "shared")
        return [value * 2 if role == "w2" else value]

    return [*(OutputTensor(f"{mlp}.shared_expert.{p}.weight", source.expert_dtype(site, r), canonical_shape(site, r, size),
                           lambda r=r: produce(r)) for r, p in _PROJ.items()), gate]
