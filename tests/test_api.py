"""The Python API at the CLI's level: save in every format, unknown keywords named, copy or in place."""

from __future__ import annotations

import json

import pytest
import torch

import sparsify
from sparsify.errors import ArgumentError, OptionError, SparsifyError
from sparsify.verify import compare

# format -> (demo, upcycle options, the format name sparsify.json records)
FORMATS = {
    "native": ("t5", {}, "sparsify-native"),
    "mixtral": ("mistral", {"every": 1}, "mixtral"),
    "qwen2-moe": ("qwen2", {}, "qwen2-moe"),
    "switch": ("t5", {"router": "switch"}, "switch"),
    "auto": ("llama", {"every": 1}, "mixtral"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_save_writes_every_format_the_cli_writes(tmp_path, fmt):
    name, options, recorded = FORMATS[fmt]
    moe = sparsify.upcycle(f"demo:{name}", experts=4, **options)
    out = sparsify.save(moe, tmp_path / "out", format=fmt)
    assert json.loads((out / "sparsify.json").read_text())["format"] == recorded
    again = sparsify.load(out)
    c = compare(moe, again)
    assert c.max_abs <= 1e-5 * c.max_ref, c
    # the same bytes as the command line writes for the same conversion
    from sparsify.cli.main import main

    args = ["upcycle", f"demo:{name}", "-e", "4", "-f", fmt, "-o", str(tmp_path / "cli"), "-q"]
    args += [f"--{k}={v}" for k, v in options.items()]
    assert main(args) == 0
    for f in sorted(out.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "cli" / f.name).read_bytes(), f.name


def test_save_refuses_a_format_that_cannot_express_the_model(tmp_path):
    moe = sparsify.upcycle("demo:llama", experts=4)  # every other layer: Mixtral has no sparse step
    with pytest.raises(OptionError, match="format='mixtral' cannot express"):
        sparsify.save(moe, tmp_path / "o", format="mixtral")
    with pytest.raises(OptionError, match="format must be one of auto, native"):
        sparsify.save(moe, tmp_path / "o", format="gguf")
    assert not (tmp_path / "o").exists()


CALLS = {
    "upcycle format": (lambda: sparsify.upcycle("demo:t5", experts=4, format="mixtral"),
                       "sparsify.upcycle() got an unexpected keyword argument 'format' (the output format is chosen when "
                       "saving: sparsify.save(model, out, format=...))"),
    "upcycle typo": (lambda: sparsify.upcycle("demo:t5", experts=4, topk=1), "'topk' (did you mean 'top_k'?)"),
    "save typo": (lambda: sparsify.save(None, "x", fromat="native"), "sparsify.save() got an unexpected keyword argument "
                  "'fromat' (did you mean 'format'?); it takes: model, out, format, force, shard_size"),
    "load unknown": (lambda: sparsify.load("x", device="cuda"), "sparsify.load() got an unexpected keyword argument "
                     "'device'; it takes: path, placement, group, backend"),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_unknown_keywords_name_the_functions_arguments(case):
    call, message = CALLS[case]
    with pytest.raises(ArgumentError) as info:
        call()
    assert message in str(info.value) and "MoEConfig" not in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, SparsifyError)


def test_upcycle_takes_the_moe_layers_training_settings():
    moe = sparsify.upcycle("demo:t5", experts=4, jitter=0.01, z_loss_coef=0.0)
    assert moe.sparsify_plan.moe.jitter == 0.01 and moe.sparsify_plan.moe.z_loss_coef == 0.0
    with pytest.raises(ArgumentError, match="it takes: experts, top_k, every, layers"):
        sparsify.upcycle("demo:t5", experts=4, jiter=0.01)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_upcycle_copies_a_module_unless_told_otherwise(demo):
    dense = demo("llama")
    before, kinds = _state(dense), [type(m).__name__ for m in dense.modules()]
    moe = sparsify.upcycle(dense, experts=4)
    assert moe is not dense and [type(m).__name__ for m in dense.modules()] == kinds
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    c = compare(dense, moe)  # the dense model still runs: the check every conversion gets
    assert c.within()
    assert not hasattr(dense, "sparsify_plan")

    same = sparsify.upcycle(dense, experts=4, copy=False)
    assert same is dense and "SparseMoE" in [type(m).__name__ for m in dense.modules()]
    assert dense.sparsify_plan.selected == moe.sparsify_plan.selected
