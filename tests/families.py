"""Tiny real transformers models of any family: its config class with small sizes, random weights.

`build_family("bart")` builds the family's seq2seq LM (else causal LM, masked LM, base model)
from `AutoConfig.for_model` with every size field the config has set small, and every
parameter drawn afresh (biases and norms too, so that a conversion that mishandles one shows).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["tiny_config", "family_class", "build_family"]

SMALL = dict(
    vocab_size=256, hidden_size=32, d_model=32, n_embd=32, embed_dim=32, dim=32, n_positions=64,
    max_position_embeddings=64, max_seq_len=64, intermediate_size=64, ffn_dim=64, encoder_ffn_dim=64, decoder_ffn_dim=64,
    d_ff=64, n_inner=64, hidden_dim=64, num_hidden_layers=2, num_layers=2, n_layer=2, n_layers=2, encoder_layers=2,
    decoder_layers=2, num_decoder_layers=2, num_attention_heads=4, n_head=4, encoder_attention_heads=4,
    decoder_attention_heads=4, num_heads=4, n_heads=4, num_key_value_heads=2, head_dim=8, d_kv=8,
    embedding_size=32, max_target_positions=64, max_source_positions=64, intermediate_groups=4, output_groups=4,
    q_groups=4, k_groups=4, v_groups=4, post_attention_groups=4, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    decoder_start_token_id=2, cls_token_id=0, sep_token_id=2, start_token_id=0,
)


def tiny_config(model_type: str, **overrides):
    """The config of `model_type` with its size fields small, then `overrides`."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    return AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if k in defaults}, **overrides)


def family_class(model_type: str) -> type:
    """The family's seq2seq LM, else causal LM, else masked LM, else base model class."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    for mapping in (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, auto.MODEL_MAPPING_NAMES):
        if model_type in mapping:
            name = mapping[model_type]
            return getattr(transformers, name[0] if isinstance(name, (list, tuple)) else name)
    raise KeyError(model_type)


@torch.no_grad()
def build_family(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny `model_type` model in eval mode, its weights drawn from a generator seeded `seed`."""
    config = tiny_config(model_type, **overrides)
    cls = family_class(model_type)
    config.architectures = [cls.__name__]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval()
