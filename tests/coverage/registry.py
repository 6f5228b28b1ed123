"""The families of the installed transformers, each with the class the sweep builds and its class.

A family is a `model_type` of transformers' auto registry (`modeling_auto.*_MAPPING_NAMES`). The
sweep builds one class per family, taken from the first mapping that lists it in `TASKS` (a
sequence-to-sequence LM before a masked LM before a causal LM, so that BERT is built as the
encoder it is and BART as the encoder-decoder), and classifies the family from its config:

- composite: its config nests the config of another registered family (a multimodal model, a
  vision-text pair, a detector over a backbone); its towers are families of their own;
- moe: its config already has experts;
- dense: everything else, swept (a dense family whose graph has no FFN is then reported as such).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Family", "TASKS", "families", "family", "composite_reason", "moe_reason"]

# (mapping in transformers.models.auto.modeling_auto, task name), in the order a family's class is chosen
TASKS = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq-lm"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech-seq2seq"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked-lm"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-lm"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio-classification"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "ctc"),
    ("MODEL_FOR_BACKBONE_MAPPING_NAMES", "backbone"),
    ("MODEL_MAPPING_NAMES", "base"),
)

# Config attributes that count experts (a value above 1 means the family is already MoE).
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


@dataclass(frozen=True)
class Family:
    """One model_type, the transformers class the sweep builds for it, and that class's task."""

    model_type: str
    class_name: str
    task: str


@lru_cache(maxsize=None)
def families() -> tuple[Family, ...]:
    """Every family of the registry's mappings in `TASKS`, sorted by model_type."""
    from transformers.models.auto import modeling_auto

    chosen: dict[str, Family] = {}
    for mapping, task in TASKS:
        for model_type, names in getattr(modeling_auto, mapping, {}).items():
            name = names[0] if isinstance(names, (tuple, list)) else names
            chosen.setdefault(model_type, Family(model_type, name, task))
    return tuple(chosen[k] for k in sorted(chosen))


def family(model_type: str) -> Family:
    """The family of `model_type` (KeyError when the installed transformers has none)."""
    for f in families():
        if f.model_type == model_type:
            return f
    raise KeyError(model_type)


def composite_reason(config_class) -> str | None:
    """Why a config is composite (it nests another registered family's config), or None."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    registered = set(CONFIG_MAPPING_NAMES.values())
    nested = [name for name, sub in (getattr(config_class, "sub_configs", None) or {}).items()
              if sub is AutoConfig or getattr(sub, "__name__", "") in registered]
    return f"composite config: nests {', '.join(nested)}; its towers are swept as families of their own" if nested else None


def moe_reason(config) -> str | None:
    """Why a config is already MoE (it counts experts), or None. Nested configs are looked in too
    (DBRX keeps its experts in ffn_config)."""
    if getattr(config, "is_moe", None) is False:  # Doge: expert fields present, experts off
        return None
    for cfg in [config, *(getattr(config, name, None) for name in getattr(config, "sub_configs", None) or {})]:
        for name in _EXPERT_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return f"already MoE: {name}={value}"
        width = getattr(cfg, "moe_intermediate_size", None)
        if isinstance(width, int) and not isinstance(width, bool) and width > 0:
            # Dots1: its default config sizes the experts but leaves their count unset
            return f"already MoE: moe_intermediate_size={width} (the experts' width)"
    return None
