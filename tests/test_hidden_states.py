"""Hidden states at the MoE layers' inputs: the layer-by-layer run of a meta-device skeleton from
its checkpoint equals the run of the loaded model, holds one module's weights at a time, and
reads each tensor at most once, stopping after the last site."""

import pytest
import torch
import transformers

import sparsify
from sparsify.io.checkpoint import Checkpoint
from sparsify.io.demo import DEMOS
from sparsify.io.skeleton import build_skeleton
from sparsify.hidden_states import site_inputs, token_batch
from tests.finetunes import save_checkpoint, word_tokenizer


class CountingCheckpoint(Checkpoint):
    """A checkpoint that counts the reads of each tensor."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = {}

    def read(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().read(name)


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_layer_by_layer_states_equal_the_loaded_models(tmp_path, demo, name):
    dense = demo(name)
    save_checkpoint(dense, tmp_path / "d")
    paths = [s.path for s in sparsify.upcycle(demo(name), experts=2, every=1).sparsify_plan.selected_sites]
    ids, mask = token_batch(word_tokenizer(), ["t5 t9 t30 t31", "t40 t41 t42 t43 t44 t45 t46"], 64)
    want, got = {}, {}
    site_inputs(dense, paths, ids, mask, lambda p, x: want.__setitem__(p, x))
    skeleton = build_skeleton(transformers.AutoConfig.from_pretrained(tmp_path / "d"))
    ckpt = CountingCheckpoint(tmp_path / "d")
    site_inputs(skeleton, paths, ids, mask, lambda p, x: got.__setitem__(p, x), weights=ckpt)
    assert list(got) == list(want) == paths  # in the order they run
    assert all(torch.equal(got[p], want[p]) for p in paths)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # nothing left loaded
    assert max(ckpt.reads.values()) <= 2  # tied embeddings: read by the input and the output side at most
    if not getattr(dense.config, "tie_word_embeddings", False) and "lm_head.weight" in ckpt:
        assert "lm_head.weight" not in ckpt.reads  # the run stopped after the last site


def test_lazy_run_holds_one_modules_weights_at_a_time(tmp_path, demo):
    save_checkpoint(demo("llama"), tmp_path / "d")
    skeleton = build_skeleton(transformers.AutoConfig.from_pretrained(tmp_path / "d"))
    ckpt = Checkpoint(tmp_path / "d")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in skeleton.modules())
    peak = [0]

    def watch(module, args, out):  # after the module ran, before it drops its weights
        peak[0] = max(peak[0], sum(p.numel() for p in skeleton.parameters() if p.device.type != "meta"))

    handles = [m.register_forward_hook(watch) for m in skeleton.modules()]
    try:
        ids, mask = token_batch(word_tokenizer(), ["t5 t6 t7"], 16)
        site_inputs(skeleton, ["model.layers.3.mlp"], ids, mask, lambda p, x: None, weights=ckpt)
    finally:
        for h in handles:
            h.remove()
    assert 0 < peak[0] <= largest
