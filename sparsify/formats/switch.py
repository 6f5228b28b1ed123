"""The Hugging Face SwitchTransformers format, for T5 sources with a relu FFN (T5 v1.0).

SwitchTransformers is T5 v1.0 with the FFN of some blocks replaced by a top-1 router
(`mlp.router.classifier`) and experts that are T5's dense relu FFN (`mlp.experts.expert_{e}.wi`,
`.wo`); the dense blocks call their FFN `mlp` where T5 says `DenseReluDense`. Each token's
expert output is scaled by its router probability, so the output does not reproduce the dense
model at initialisation, exactly as in the Switch paper; the plan must ask for that routing.

Which blocks are sparse is not a free choice: the config derives a step from the count of
sparse layers (`num_layers // num_sparse_*_layers`) and block i is sparse when
`i % step == 1 or step == 1`. In practice that is every block or every other block starting
at 1, i.e. `--every 1` or `--every 2`, and each stack needs at least one sparse block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ..io.safetensors_io import OutputTensor
from ..plan import FFNSite, UpcyclePlan
from .base import OutputFormat
from .hf_common import (
    carried_config, check_ffn, check_layout, check_shared, expert_tensors, layer_of, router_tensor, walk_tensors,
)
from .tensors import TensorSource

__all__ = ["SwitchFormat", "switch_sparse_layers", "DROPLESS_CAPACITY", "CAPACITY_SEQUENCE"]

# SwitchTransformers counts capacity per sequence (`cumsum(one_hot) <= expert_capacity` along it)
# and allocates nothing by it, so a capacity no sequence can reach is exactly dropless.
DROPLESS_CAPACITY = 2**31 - 1
# With a capacity factor the capacity must be a fixed number of tokens: computed for sequences
# of T5's pre-training input length.
CAPACITY_SEQUENCE = 512

_STACKS = {"encoder": "encoder.block.{i}.layer.1.DenseReluDense", "decoder": "decoder.block.{i}.layer.2.DenseReluDense"}


def switch_sparse_layers(num_layers: int, num_sparse: int) -> set[int]:
    """The blocks SwitchTransformers makes sparse in a stack of `num_layers` blocks when told
    `num_sparse` (mirrors SwitchTransformersConfig and SwitchTransformersStack)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    return {i for i in range(num_layers) if (i % step == 1 or step == 1)} if step > 0 else set()


def _sparse_by_stack(plan: UpcyclePlan) -> dict[str, set[int]]:
    chosen: dict[str, set[int]] = {stack: set() for stack in _STACKS}
    for s in plan.selected_sites:
        chosen[s.path.split(".")[0]].add(layer_of(s))
    return chosen


def _layer_counts(config: Any) -> dict[str, int]:
    return {"encoder": config.num_layers, "decoder": config.num_decoder_layers}


class SwitchFormat(OutputFormat):
    """Hugging Face `SwitchTransformersForConditionalGeneration` from a relu T5."""

    name = "switch"
    description = "Hugging Face SwitchTransformers (T5 v1.0 relu sources; top-1 switch routing, every 1 or 2 blocks)"

    def explain(self, plan: UpcyclePlan, config: Any) -> str | None:
        model_type = getattr(config, "model_type", None)
        if model_type != "t5":
            return f"SwitchTransformers is T5 with MoE FFNs, and this source is {model_type!r}"
        why = plan.uniform()
        if why:
            return f"SwitchTransformers has one MoE setting for the whole model, and {why}"
        why = check_shared(plan, "SwitchTransformers") or self._expert_size(plan)
        if why:
            return why
        gated = next((s for s in plan.selected_sites if s.form == "gated"), None)
        if gated is not None:
            return (f"SwitchTransformers has no gated FFN (its experts are T5 v1.0's relu wi/wo), and this T5's "
                    f"FFNs are gated {gated.activation} (T5 v1.1 / Flan-T5)")
        why = check_ffn(plan.selected_sites, "dense", "relu", "SwitchTransformers experts are") or self._layout(plan)
        if why:
            return why
        if not getattr(config, "scale_decoder_outputs", True):
            return "this T5 does not rescale decoder outputs (untied embeddings), which SwitchTransformers always does"
        moe = plan.moe
        # top-1 without renormalisation weighs the expert by its probability: the same routing
        if not (moe.router == "switch" or (moe.router == "topk" and moe.top_k == 1 and not moe.normalize)):
            return (f"SwitchTransformers routes each token to its top-1 expert and scales it by the router "
                    f"probability (--router switch); this plan routes {moe.router} top-{moe.top_k}")
        if moe.router_dtype != "float32":
            return f"SwitchTransformers computes the router in float32, not {moe.router_dtype}"
        counts = _layer_counts(config)
        for stack, sparse in _sparse_by_stack(plan).items():
            if sparse != switch_sparse_layers(counts[stack], len(sparse)):
                got = ",".join(map(str, sorted(sparse))) or "none"
                return (f"SwitchTransformers makes every block or every other block from block 1 sparse, "
                        f"and this plan converts {stack} blocks {got} of {counts[stack]}; use --every 2 or --every 1")
        return None

    @staticmethod
    def _expert_size(plan: UpcyclePlan) -> str | None:
        # one d_ff serves the dense and the sparse blocks
        site = plan.selected_sites[0]
        size = plan.layer(site).expert_size(site)
        dense = [s for s in plan.sites if s.path not in set(plan.selected)]
        if dense and size != site.intermediate_size:
            return (f"SwitchTransformers has one d_ff for dense and sparse blocks, and these experts hold {size} of "
                    f"the FFN's {site.intermediate_size} neurons while {len(dense)} blocks stay dense; use --every 1")
        return None

    @staticmethod
    def _layout(plan: UpcyclePlan) -> str | None:
        for stack, pattern in _STACKS.items():
            sites = [s for s in plan.sites if s.path.startswith(stack + ".")]
            if not sites:
                return f"SwitchTransformers has an encoder and a decoder, and this model has no {stack} FFNs"
            why = check_layout(sites, pattern, "T5ForConditionalGeneration")
            if why:
                return why
        return None

    def keeps_meaning(self, plan: UpcyclePlan, config: Any) -> str | None:
        if plan.moe.capacity_factor is not None:
            return (f"SwitchTransformers' expert capacity is a fixed token count per sequence, so --capacity-factor "
                    f"is only approximated (for {CAPACITY_SEQUENCE}-token sequences)")
        return None

    def default_options(self, config: Any) -> dict[str, Any]:
        return {"router": "switch", "top_k": 1}

    def config_dict(self, plan: UpcyclePlan, config: Any) -> dict[str, Any]:
        import transformers

        moe = plan.moe
        sparse = _sparse_by_stack(plan)
        if moe.capacity_factor is None:
            capacity = DROPLESS_CAPACITY
        else:
            capacity = math.ceil(moe.capacity_factor * CAPACITY_SEQUENCE / moe.num_experts)
        kwargs = carried_config(config, transformers.SwitchTransformersConfig, extra=("decoder_start_token_id",))
        kwargs.update(
            d_ff=plan.layer(plan.selected_sites[0]).expert_size(plan.selected_sites[0]),
            dense_act_fn="relu",
            num_experts=moe.num_experts,
            num_sparse_encoder_layers=len(sparse["encoder"]),
            num_sparse_decoder_layers=len(sparse["decoder"]),
            expert_capacity=capacity,
            router_bias=False,
            router_dtype="float32",
            router_jitter_noise=moe.jitter,
            router_ignore_padding_tokens=False,
            router_aux_loss_coef=moe.aux_loss_coef,
            router_z_loss_coef=moe.z_loss_coef,
            tie_word_embeddings=True,
            architectures=["SwitchTransformersForConditionalGeneration"],
        )
        return transformers.SwitchTransformersConfig(**kwargs).to_dict()

    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        def site_tensors(site: FFNSite) -> list[OutputTensor]:
            mlp = site.path.removesuffix(".DenseReluDense") + ".mlp"
            names = {"w1": lambda i: f"{mlp}.experts.expert_{i}.wi.weight",
                     "w2": lambda i: f"{mlp}.experts.expert_{i}.wo.weight"}
            # float32 as the config's router_dtype says (the paper's selective precision)
            router = router_tensor(f"{mlp}.router.classifier.weight", site, plan, source, torch.float32)
            return [router, *expert_tensors(site, plan, source, names)]

        return walk_tensors(model, plan, source, lambda name: name.replace(".DenseReluDense.", ".mlp."), site_tensors)
