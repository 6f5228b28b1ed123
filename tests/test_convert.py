"""The conversion executor: streaming from checkpoints equals the in-memory path."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sparsify
from sparsify.convert import convert
from sparsify.errors import OptionError, OutputError
from tests.conftest import DEMO_NAMES


def _tensors(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(out / shard))
    return tensors


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_streamed_output_equals_in_memory_output(tmp_path, demo, name):
    dense = tmp_path / "dense"
    demo(name).save_pretrained(dense)
    r = convert(str(dense), tmp_path / "streamed", experts=4, format="native")
    assert r.streamed and r.format == "sparsify-native"
    sparsify.save(sparsify.upcycle(str(dense), experts=4), tmp_path / "memory")
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    loaded = sparsify.load(tmp_path / "streamed")
    from sparsify.verify import compare

    c = compare(demo(name), loaded)
    assert c.max_abs < 1e-5 * c.max_ref


def test_streamed_noise_equals_in_memory_noise(tmp_path, demo):
    dense = tmp_path / "dense"
    demo("gpt2").save_pretrained(dense)
    convert(str(dense), tmp_path / "s", experts=4, every=1, noise=0.01, seed=7, format="native")
    sparsify.save(sparsify.upcycle(str(dense), experts=4, every=1, noise=0.01, seed=7), tmp_path / "m")
    _assert_same_tensors(tmp_path / "s", tmp_path / "m")


def test_bin_checkpoint_streams_too(tmp_path, demo):
    dense = tmp_path / "dense"
    demo("bert").save_pretrained(dense, safe_serialization=False)
    convert(str(dense), tmp_path / "s", experts=4, format="native")
    sparsify.save(sparsify.upcycle(str(dense), experts=4), tmp_path / "m")
    _assert_same_tensors(tmp_path / "s", tmp_path / "m")


def test_dtype_and_shard_size(tmp_path, demo):
    dense = tmp_path / "dense"
    demo("llama").save_pretrained(dense)
    r = convert(str(dense), tmp_path / "bf16", experts=4, dtype="bfloat16", shard_size="300KB", format="native")
    tensors = _tensors(tmp_path / "bf16")
    routers = {k for k in tensors if k.endswith("router.weight")}
    assert routers and all(tensors[k].dtype == torch.float32 for k in routers)  # routers stay float32
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k not in routers)
    shards = list((tmp_path / "bf16").glob("model-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size < 400_000 or len(shards) == 1 for s in shards)
    assert r.bytes_written == sum(t.numel() * t.element_size() for t in tensors.values())
    model = sparsify.load(tmp_path / "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(OptionError, match="--dtype"):
        convert("demo:t5", tmp_path / "o", experts=4, dtype="int8")
    with pytest.raises(OptionError, match="--format"):
        convert("demo:t5", tmp_path / "o", experts=4, format="gguf")
    assert not (tmp_path / "o").exists()


def test_not_enough_disk_space(tmp_path, demo):
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; this machine does not allow it")
    try:
        dense = tmp_path / "dense"
        demo("llama").save_pretrained(dense)
        with pytest.raises(OutputError, match="not enough disk space"):
            convert(str(dense), small / "out", experts=8, every=1)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
