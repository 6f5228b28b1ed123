"""Fixtures of the io tests: checkpoints big enough that writing their upcycled form takes a while."""

import pytest
import torch
import transformers


def save_llama(d, vocab_size: int, hidden_size: int, intermediate_size: int):
    """A seeded 4-layer llama of these sizes, saved to `d` (returned)."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def big_dense(tmp_path_factory):
    """A llama big enough that writing its upcycled form takes a while (~150 MB out)."""
    return save_llama(tmp_path_factory.mktemp("big") / "dense", 1024, 256, 768)
