"""Fixtures of the io tests: a checkpoint big enough that writing its upcycled form takes a while."""

import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def big_dense(tmp_path_factory):
    """A llama big enough that writing its upcycled form takes a while (~150 MB out)."""
    d = tmp_path_factory.mktemp("big") / "dense"
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d
