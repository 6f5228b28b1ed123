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

from ..io.safetensors_io import OutputTensor
from ..plan import FFNSite, UpcyclePlan
from .base import OutputFormat
from .hf_common import (
    carried_config, check_ffn, check_layout, check_routing, expert_tensors, layer_of, router_tensor, walk_tensors,
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
        step, dense = sparse_step_layout(config.num_hidden_layers, {layer_of(s) for s in sites}, plan.init.get("every"))
        kwargs = carried_config(config, config_cls, extra)
        kwargs.update(
            moe_intermediate_size=sites[0].intermediate_size,
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
            kwargs["shared_expert_intermediate_size"] = 0
        if config.model_type == "qwen3":
            # Qwen3 slides only from max_window_layers on; Qwen3-MoE slides in every layer or none
            kwargs["use_sliding_window"] = set(getattr(config, "layer_types", None) or []) == {"sliding_attention"}
        return config_cls(**kwargs).to_dict()

    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        e = plan.moe.num_experts
        shared = model.config.model_type == "qwen2"

        def site_tensors(site: FFNSite) -> list[OutputTensor]:
            mlp = f"model.layers.{layer_of(site)}.mlp"
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
            names = {role: (lambda i, p=p: f"{mlp}.experts.{i}.{p}.weight") for role, p in proj.items()}
            out = [router_tensor(f"{mlp}.gate.weight", site, source, e), *expert_tensors(site, source, e, names)]
            if shared:
                out.extend(_empty_shared_expert(mlp, site, source.expert_dtype(site, "w1")))
            return out

        return walk_tensors(model, plan, source, lambda name: name, site_tensors)


def _empty_shared_expert(mlp: str, site: FFNSite, dtype: torch.dtype) -> list[OutputTensor]:
    h = site.hidden_size
    shapes = {"shared_expert.gate_proj": (0, h), "shared_expert.up_proj": (0, h), "shared_expert.down_proj": (h, 0),
              "shared_expert_gate": (1, h)}
    return [OutputTensor(f"{mlp}.{n}.weight", dtype, s, lambda s=s: [torch.zeros(s, dtype=dtype)])
            for n, s in shapes.items()]
