"""A native output must not load silently wrong in plain transformers: its config.json's
model_type is a marker that the Auto classes refuse, naming sparsify.load; every sparsify reader
still reads it (through `read_config`), and the Hugging Face formats load in transformers as before."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparsify
from sparsify.formats.native import NATIVE_MODEL_TYPE, SOURCE_MODEL_TYPE, read_config
from sparsify.io.demo import build_demo
from sparsify.verify import compare


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    from sparsify.cli.main import main

    root = tmp_path_factory.mktemp("native-config")
    out = {}
    for name in ("llama", "t5", "bert", "gpt2"):
        assert main(["upcycle", f"demo:{name}", "--experts", "4", "--format", "native", "-o", str(root / name)]) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["llama", "t5", "bert", "gpt2"])
@pytest.mark.parametrize("auto", ["AutoConfig", "AutoModel", "AutoModelForCausalLM"])
def test_transformers_auto_classes_refuse_a_native_output_naming_sparsify_load(native, name, auto):
    with pytest.raises(ValueError, match="sparsify.load"):
        getattr(transformers, auto).from_pretrained(native[name])


@pytest.mark.parametrize("name", ["llama", "t5", "bert", "gpt2"])
def test_sparsify_reads_what_transformers_refuses(native, name, sparsify_cli):
    data = json.loads((native[name] / "config.json").read_text())
    assert data["model_type"] == NATIVE_MODEL_TYPE and data[SOURCE_MODEL_TYPE] == build_demo(name).config.model_type
    assert type(read_config(native[name])) is type(build_demo(name).config)
    assert compare(build_demo(name), sparsify.load(native[name])).within()
    for args in (["inspect", native[name]], ["verify", native[name]], ["verify", f"demo:{name}", native[name]]):
        code, out, err = sparsify_cli(*args)
        assert code == 0, (args, err)


def test_shards_and_expert_parallel_loading_read_it(native, tmp_path, sparsify_cli):
    plan = tmp_path / "plan.json"
    assert sparsify_cli("partition", native["llama"], "-n", "2", "-o", plan)[0] == 0
    assert sparsify_cli("shard", native["llama"], "--plan", plan, "-o", tmp_path / "shards")[0] == 0
    assert sparsify_cli("verify", tmp_path / "shards")[0] == 0  # loading them: tests/partition/test_load.py


def test_an_output_written_before_the_marker_still_loads(native, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(native["llama"], old)
    data = json.loads((old / "config.json").read_text())
    data["model_type"] = data.pop(SOURCE_MODEL_TYPE)
    (old / "config.json").write_text(json.dumps(data))
    manifest = json.loads((old / "sparsify.json").read_text())
    manifest["files"].pop("config.json", None)  # as an output of a sparsify that recorded no hashes of it
    (old / "sparsify.json").write_text(json.dumps(manifest))
    assert compare(build_demo("llama"), sparsify.load(old)).within()


@pytest.mark.parametrize("source, fmt, cls", [("demo:llama", "mixtral", "MixtralForCausalLM"),
                                              ("demo:qwen2", "qwen2-moe", "Qwen2MoeForCausalLM"),
                                              ("demo:t5", "switch", "SwitchTransformersForConditionalGeneration")])
def test_hugging_face_formats_keep_loading_in_transformers(tmp_path, sparsify_cli, source, fmt, cls):
    extra = ["--every", "1"] if fmt != "switch" else ["--router", "switch"]
    assert sparsify_cli("upcycle", source, "--experts", "4", "--format", fmt, "-o", tmp_path / "out", *extra)[0] == 0
    auto = transformers.AutoModelForSeq2SeqLM if fmt == "switch" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == cls  # (that it computes what sparsify converted: tests/formats/test_<format>.py)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert torch.isfinite(next(model.parameters())).all()
