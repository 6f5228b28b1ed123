"""The native format: save/load round trip, sharding, manifest, provenance."""

import json

import pytest

import sparsify
from sparsify.errors import PlanError, SourceError
from sparsify.verify import compare
from tests.conftest import DEMO_NAMES


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_load_reproduces_saved_model_exactly(tmp_path, name):
    moe = sparsify.upcycle(f"demo:{name}", experts=4, top_k=2)
    out = sparsify.save(moe, tmp_path / "out")
    back = sparsify.load(out)
    assert compare(moe, back).max_abs == 0.0
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "sparsify.json", "model.safetensors.index.json"} <= set(files)
    assert any(f.startswith("model-00001-of-") for f in files)
    manifest = json.loads((out / "sparsify.json").read_text())
    assert {v["moe"]["num_experts"] for v in manifest["plan"]["layers"].values()} == {4}
    assert manifest["source"]["spec"] == f"demo:{name}"
    assert manifest["sparsify_version"] == sparsify.__version__


def test_sharding_and_source_hashes(tmp_path, demo):
    dense_dir = tmp_path / "dense"
    demo("gpt2").save_pretrained(dense_dir)
    moe = sparsify.upcycle(str(dense_dir), experts=4)
    out = sparsify.save(moe, tmp_path / "out", shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    manifest = json.loads((out / "sparsify.json").read_text())
    assert list(manifest["source"]["xxh3_128"]) == ["model.safetensors"]
    assert compare(moe, sparsify.load(out)).max_abs == 0.0


def test_save_refuses_existing_output_and_unconverted_models(tmp_path, demo):
    moe = sparsify.upcycle("demo:bert", experts=2)
    sparsify.save(moe, tmp_path / "o")
    from sparsify.errors import OutputError

    with pytest.raises(OutputError, match="--force"):
        sparsify.save(moe, tmp_path / "o")
    sparsify.save(moe, tmp_path / "o", force=True)
    with pytest.raises(PlanError):
        sparsify.save(demo("bert"), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_load_reports_damaged_outputs(tmp_path):
    out = sparsify.save(sparsify.upcycle("demo:llama", experts=2), tmp_path / "o")
    shard = next(out.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SourceError, match="damaged \\(truncated"):
        sparsify.load(out)
    shard.unlink()
    with pytest.raises(SourceError, match="missing"):
        sparsify.load(out)
    with pytest.raises(SourceError, match="sparsify.json"):
        sparsify.load(tmp_path)
