"""Built-in demo models: tiny, seeded, random-weight models of real architectures.

They let anyone try sparsify offline (`demo:t5`), and they are what the tests convert.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from ..errors import SourceError

if TYPE_CHECKING:
    import torch

__all__ = ["DEMOS", "build_demo"]

_VOCAB, _D, _FF, _LAYERS, _HEADS = 512, 64, 128, 4, 4


def _config(cls: str, **kwargs: Any) -> Callable[[], Any]:
    # transformers is imported when a demo is built, not with this module: the command line
    # lists the demos in its help without loading it.
    return lambda: getattr(importlib.import_module("transformers"), cls)(**kwargs)


DEMOS = {
    "t5": _config("T5Config",
        vocab_size=_VOCAB, d_model=_D, d_ff=_FF, d_kv=_D // _HEADS, num_layers=_LAYERS,
        num_decoder_layers=_LAYERS, num_heads=_HEADS, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        architectures=["T5ForConditionalGeneration"],
    ),
    "t5-gated": _config("T5Config",
        vocab_size=_VOCAB, d_model=_D, d_ff=_FF, d_kv=_D // _HEADS, num_layers=_LAYERS,
        num_decoder_layers=_LAYERS, num_heads=_HEADS, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        architectures=["T5ForConditionalGeneration"],
    ),
    "bert": _config("BertConfig",
        vocab_size=_VOCAB, hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, max_position_embeddings=128, architectures=["BertModel"],
    ),
    "gpt2": _config("GPT2Config",
        vocab_size=_VOCAB, n_embd=_D, n_inner=_FF, n_layer=_LAYERS, n_head=_HEADS,
        n_positions=128, bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"],
    ),
    "llama": _config("LlamaConfig",
        vocab_size=_VOCAB, hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, pad_token_id=None, architectures=["LlamaForCausalLM"],
    ),
    "mistral": _config("MistralConfig",
        vocab_size=_VOCAB, hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=64, bos_token_id=0, eos_token_id=1, architectures=["MistralForCausalLM"],
    ),
    "qwen2": _config("Qwen2Config",
        vocab_size=_VOCAB, hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, architectures=["Qwen2ForCausalLM"],
    ),
    "qwen3": _config("Qwen3Config",
        vocab_size=_VOCAB, hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, architectures=["Qwen3ForCausalLM"],
    ),
}


def build_demo(name: str, seed: int = 0) -> torch.nn.Module:
    """The demo model `name` (see `DEMOS`), weights drawn from a generator seeded with `seed`."""
    if name not in DEMOS:
        raise SourceError(f"unknown demo 'demo:{name}'; choose one of {', '.join('demo:' + d for d in DEMOS)}")
    import torch
    import transformers

    config = DEMOS[name]()
    cls = getattr(transformers, config.architectures[0])
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
