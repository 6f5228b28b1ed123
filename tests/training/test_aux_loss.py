"""The loss an upcycled model returns in training includes its weighted router losses, for every
kind of model sparsify makes, and nothing changes outside training."""

from __future__ import annotations

import pytest
import torch
import transformers

import sparsify
from sparsify.training import include_aux_losses, includes_aux_losses


def _batch(model, seed: int = 0) -> dict:
    ids = torch.randint(2, 512, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _loss(model, batch, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks and router jitter in every call
    return model(**batch, **kwargs).loss


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "t5-gated"])
def test_training_loss_is_task_loss_plus_aux_losses(demo, name):
    moe = sparsify.upcycle(demo(name), experts=4, top_k=2, every=2, noise=0.01)
    assert includes_aux_losses(moe)
    moe.train()
    batch = _batch(moe)
    with_aux = _loss(moe, batch)
    aux = sparsify.aux_losses(moe)
    include_aux_losses(moe, False)
    task = _loss(moe, batch)
    assert aux.requires_grad and aux.item() > 0.01  # balancing loss ~1 per layer, times 0.01
    torch.testing.assert_close(with_aux, task + aux, rtol=1e-6, atol=1e-6)
    include_aux_losses(moe)
    with_aux.backward()
    assert all(m.router.weight.grad is not None for m in moe.modules() if isinstance(m, sparsify.SparseMoE))


def test_evaluation_and_unlabelled_forwards_are_unchanged(demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2)
    batch = _batch(moe)
    moe.eval()
    with torch.no_grad():
        evaluated = moe(**batch).loss
        include_aux_losses(moe, False)
        plain = moe(**batch).loss
    assert torch.equal(evaluated, plain)
    include_aux_losses(moe)
    moe.train()
    assert moe(input_ids=batch["input_ids"]).loss is None


def test_tuple_outputs_get_the_aux_losses_too(demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2).train()
    batch = _batch(moe)
    as_tuple = moe(**batch, return_dict=False)[0]
    aux = sparsify.aux_losses(moe)
    torch.testing.assert_close(as_tuple, moe(**batch).loss, rtol=1e-6, atol=1e-6)
    include_aux_losses(moe, False)
    torch.testing.assert_close(as_tuple, moe(**batch, return_dict=False)[0] + aux, rtol=1e-6, atol=1e-6)


def test_aux_losses_are_weighted_by_the_micro_batch_share(demo):
    """Under gradient accumulation the Trainer passes `num_items_in_batch` for all micro-batches;
    the router losses then weigh as much as this micro-batch's labels do."""
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2).train()
    batch = _batch(moe)
    labels = batch["labels"][..., 1:].numel()  # a causal LM's loss skips position 0, as the Trainer counts
    whole = moe(**batch, num_items_in_batch=torch.tensor(labels)).loss
    half = moe(**batch, num_items_in_batch=torch.tensor(2 * labels)).loss
    torch.testing.assert_close(half, whole / 2, rtol=1e-6, atol=1e-6)


# Hugging Face formats: (demo, format, the output's transformers class)
HF_FORMATS = [
    ("llama", "mixtral", transformers.MixtralForCausalLM),
    ("qwen2", "qwen2-moe", transformers.Qwen2MoeForCausalLM),
    ("t5", "switch", transformers.SwitchTransformersForConditionalGeneration),
]


def _router_losses(out, config) -> torch.Tensor:
    """The weighted router losses the transformers class adds, from the fields it returns."""
    if hasattr(out, "aux_loss"):
        return config.router_aux_loss_coef * out.aux_loss
    return (config.router_z_loss_coef * (out.encoder_z_loss + out.decoder_z_loss)
            + config.router_aux_loss_coef * (out.encoder_aux_loss + out.decoder_aux_loss))


@pytest.mark.parametrize("name,fmt,cls", HF_FORMATS, ids=[f[1] for f in HF_FORMATS])
@pytest.mark.parametrize("loader", ["sparsify.load", "transformers"])
def test_hf_formats_add_their_router_losses_in_training(tmp_path, sparsify_cli, name, fmt, cls, loader):
    code, _, err = sparsify_cli("upcycle", f"demo:{name}", "--experts", "4", "--format", fmt, "-o", tmp_path / "out")
    assert code == 0, err
    if loader == "sparsify.load":
        model = sparsify.load(tmp_path / "out")
    else:
        model = include_aux_losses(cls.from_pretrained(tmp_path / "out"))  # the one call such a model needs
    assert isinstance(model, cls) and includes_aux_losses(model)
    model.train()
    batch = _batch(model)
    torch.manual_seed(0)
    out = model(**batch)
    task = _loss(model, batch, output_router_logits=False)  # an explicit choice is respected
    added = _router_losses(out, model.config)
    assert added.item() > 0
    torch.testing.assert_close(out.loss, task + added, rtol=1e-6, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, model(**batch, output_router_logits=False).loss)
