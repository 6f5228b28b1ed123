"""Model sources: local directories (safetensors or .bin), demos, and their errors."""

import json

import pytest
import torch

from sparsify.errors import SourceError
from sparsify.io.sources import load_source, resolve_source
from sparsify.verify import compare


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_directory_source_loads_the_same_model(tmp_path, demo, safe):
    demo("t5").save_pretrained(tmp_path / "m", safe_serialization=safe)
    model, src = load_source(str(tmp_path / "m"))
    assert src.kind == "dir" and src.files
    assert compare(demo("t5"), model).max_abs == 0.0


def test_demo_is_seeded_and_unknown_demo_refused(demo):
    assert compare(demo("gpt2"), demo("gpt2")).max_abs == 0.0
    with pytest.raises(SourceError, match="unknown demo"):
        resolve_source("demo:nope")


def test_tensor_shape_disagreeing_with_config(tmp_path, demo):
    demo("llama").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="do not match config.json"):
        load_source(str(tmp_path / "m"))


def test_shard_listed_in_index_but_missing(tmp_path, demo):
    demo("bert").save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "m" / victim).unlink()
    with pytest.raises(SourceError, match="listed in .* but missing"):
        load_source(str(tmp_path / "m"))


def test_a_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(torch.zeros(1).numpy().tobytes())
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(str(f))
