"""The Hugging Face Mixtral format, for Llama- and Mistral-family sources.

Mixtral is the Mistral architecture with every FFN replaced by a sparse MoE block: a router
(`block_sparse_moe.gate`) and experts that are gated SiLU FFNs (`w1` gate, `w3` up, `w2` down),
softmax top-k routing with the k weights renormalised, no token dropping. Upcycling a Llama or
Mistral model with identical experts therefore reproduces the dense logits.

Tensors are written in the hub layout of Mixtral-8x7B (one tensor per expert and projection),
which is what mergekit writes and other runtimes (vLLM, llama.cpp) read; transformers fuses
them into its in-memory layout when loading.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..io.safetensors_io import OutputTensor
from ..plan import FFNSite, UpcyclePlan
from .base import OutputFormat
from .hf_common import (
    carried_config, check_ffn, check_layout, check_routing, check_shared, expert_tensors, layer_of, router_tensor, walk_tensors,
)
from .tensors import TensorSource

__all__ = ["MixtralFormat", "SOURCE_TYPES"]

# Architectures whose decoder layer is Mixtral's apart from the FFN.
SOURCE_TYPES = ("llama", "mistral")


class MixtralFormat(OutputFormat):
    """Hugging Face `MixtralForCausalLM`: every layer MoE, renormalised top-k, function-preserving."""

    name = "mixtral"
    description = "Hugging Face Mixtral (Llama/Mistral sources; every layer MoE, renormalised top-k)"

    def explain(self, plan: UpcyclePlan, config: Any) -> str | None:
        model_type = getattr(config, "model_type", None)
        if model_type not in SOURCE_TYPES:
            return f"Mixtral is the Llama/Mistral architecture with MoE FFNs, and this source is {model_type!r}"
        if getattr(config, "attention_bias", False):
            return "the source's attention projections have biases, which Mixtral's attention lacks"
        why = (check_routing(plan, "Mixtral") or check_shared(plan, "Mixtral")
               or check_ffn(plan.selected_sites, "gated", "silu", "Mixtral experts are")
               or check_layout(plan.sites, "model.layers.{i}.mlp", f"{model_type.capitalize()}ForCausalLM"))
        if why:
            return why
        if not plan.moe.normalize:
            return "Mixtral renormalises the top-k routing weights to sum to 1; drop --no-normalize"
        converted = sorted(layer_of(s) for s in plan.selected_sites)
        if len(converted) != config.num_hidden_layers:
            return (f"Mixtral has no sparse step: every layer is an MoE layer, but this plan converts layers "
                    f"{','.join(map(str, converted))} of {config.num_hidden_layers}; use --every 1 or --format native")
        return None

    def default_options(self, config: Any) -> dict[str, Any]:
        return {"every": 1}

    def config_dict(self, plan: UpcyclePlan, config: Any) -> dict[str, Any]:
        import transformers

        moe = plan.moe
        kwargs = carried_config(config, transformers.MixtralConfig)
        kwargs.update(
            intermediate_size=plan.layer(plan.selected_sites[0]).expert_size(plan.selected_sites[0]),
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_aux_loss_coef=moe.aux_loss_coef,
            router_jitter_noise=moe.jitter,
            output_router_logits=False,
            architectures=["MixtralForCausalLM"],
        )
        return transformers.MixtralConfig(**kwargs).to_dict()

    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        def site_tensors(site: FFNSite) -> list[OutputTensor]:
            moe = f"model.layers.{layer_of(site)}.block_sparse_moe"
            # our roles are Mixtral's: w1 gate, w3 up, w2 down
            names = {role: (lambda i, r=role: f"{moe}.experts.{i}.{r}.weight") for role in ("w1", "w3", "w2")}
            return [router_tensor(f"{moe}.gate.weight", site, plan, source), *expert_tensors(site, plan, source, names)]

        return walk_tensors(model, plan, source, lambda name: name, site_tensors)
