"""`save_pretrained` of an upcycled model writes what `sparsify.load` reads, into a directory that
may hold other files, as transformers' method does."""

from __future__ import annotations

import json

import pytest
import torch

import sparsify
from sparsify.errors import OptionError, PlanError


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_save_pretrained_writes_the_native_format(tmp_path, demo, name):
    moe = sparsify.upcycle(demo(name), experts=4, top_k=2, every=2, noise=0.01)
    moe.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "sparsify.json").read_text())
    assert manifest["format"] == "sparsify-native" and manifest["plan"] == moe.sparsify_plan.to_dict()
    ids = torch.randint(2, 512, (2, 10))
    kwargs = {"decoder_input_ids": ids} if name == "t5" else {}
    loaded = sparsify.load(tmp_path)
    loaded.eval(), moe.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, **kwargs).logits, moe(input_ids=ids, **kwargs).logits)


def test_save_pretrained_replaces_only_the_model_files(tmp_path, demo):
    first = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2, noise=0.01)
    first.save_pretrained(tmp_path, max_shard_size="100KB")
    old_shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(old_shards) > 1
    (tmp_path / "optimizer.pt").write_bytes(b"the trainer's")
    (tmp_path / "checkpoint-10").mkdir()
    second = sparsify.upcycle(demo("llama", seed=1), experts=4, top_k=2, every=2, noise=0.01)
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert (tmp_path / "optimizer.pt").read_bytes() == b"the trainer's" and (tmp_path / "checkpoint-10").is_dir()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind
    ids = torch.randint(2, 512, (2, 10))
    assert torch.equal(_logits(sparsify.load(tmp_path), ids), _logits(second, ids))


def test_save_pretrained_refuses_what_it_cannot_do(tmp_path, demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2)
    with pytest.raises(OptionError, match="push_to_hub"):
        moe.save_pretrained(tmp_path, push_to_hub=True)
    sharded = {k: v[: max(1, v.shape[0] // 2)] for k, v in moe.state_dict().items()}
    with pytest.raises(PlanError, match="unsharded"):
        moe.save_pretrained(tmp_path, state_dict=sharded)
    assert list(tmp_path.iterdir()) == []
    moe.save_pretrained(tmp_path / "not-main", is_main_process=False)  # other ranks write nothing
    assert not (tmp_path / "not-main").exists()


def test_hf_format_save_pretrained_keeps_sparsify_json(tmp_path, sparsify_cli):
    import transformers

    code, _, err = sparsify_cli("upcycle", "demo:llama", "--experts", "4", "--format", "mixtral", "-o", tmp_path / "out")
    assert code == 0, err
    model = sparsify.load(tmp_path / "out")
    model.save_pretrained(tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / "sparsify.json").read_text())
    assert manifest["format"] == "mixtral" and manifest["plan"] == model.sparsify_plan.to_dict()
    ids = torch.randint(2, 512, (2, 10))
    want = _logits(model, ids)
    for loaded in (sparsify.load(tmp_path / "again"), transformers.MixtralForCausalLM.from_pretrained(tmp_path / "again")):
        torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=0)
