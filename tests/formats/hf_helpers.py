"""Shared steps of the Hugging Face format tests: convert a demo (cached per session), write it
through a format by the in-memory and the streaming path, read an output back."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import sparsify
from sparsify.formats.registry import get_format
from sparsify.formats.tensors import ModelTensors, SourceTensors
from sparsify.io.checkpoint import Checkpoint
from sparsify.io.demo import build_demo
from sparsify.io.safetensors_io import SafetensorsFile
from sparsify.io.skeleton import build_skeleton
from sparsify.moe.config import MoEConfig
from sparsify.passes import FindFFN, PassManager, SelectLayers, UpcycleFFN

EXPERTS = 4


@functools.lru_cache(maxsize=None)
def _upcycled(name: str, options: tuple) -> torch.nn.Module:
    return sparsify.upcycle(f"demo:{name}", experts=EXPERTS, **dict(options))


def upcycled(name: str, **options) -> torch.nn.Module:
    """`sparsify.upcycle("demo:NAME", experts=4, **options)`, converted once per session (tests
    only read the result)."""
    return _upcycled(name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())))


@functools.lru_cache(maxsize=None)
def dense(name: str) -> torch.nn.Module:
    """The dense demo model."""
    return build_demo(name)


def write_in_memory(fmt_name: str, model: torch.nn.Module, out: Path) -> Path:
    """Write a converted model through the Python path (`ModelTensors`)."""
    plan = model.sparsify_plan
    return get_format(fmt_name).write(out, model, plan=plan, source=ModelTensors(model),
                                      manifest={"plan": plan.to_dict()})


def write_both_ways(fmt_name: str, name: str, tmp: Path, every: int, **options) -> tuple[Path, Path]:
    """Save demo NAME as a dense directory and write it through the format twice: streamed
    (skeleton on meta, plan, `SourceTensors`) and in memory (`sparsify.upcycle`, `ModelTensors`)."""
    dense_dir = tmp / "dense"
    dense(name).save_pretrained(dense_dir)
    config = transformers.AutoConfig.from_pretrained(dense_dir)
    passes = [FindFFN(), SelectLayers(every=every), UpcycleFFN(experts=EXPERTS, **options)]
    result = PassManager(passes).run(build_skeleton(config))
    source = SourceTensors(Checkpoint(dense_dir), result.plan, result.model)
    streamed = get_format(fmt_name).write(tmp / "streamed", result.model, plan=result.plan, source=source,
                                          manifest={"plan": result.plan.to_dict()})
    model = sparsify.upcycle(str(dense_dir), experts=EXPERTS, every=every, **options)
    return streamed, write_in_memory(fmt_name, model, tmp / "in-memory")


def read_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory, through its index, in the order written."""
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index.values()):
        values = load_file(out / shard)
        # header order is write order (load_file's order is ambiguous for zero-size tensors)
        tensors.update({name: values[name] for name in SafetensorsFile(out / shard).tensors})
    return tensors


def assert_same_output(a: Path, b: Path) -> None:
    """Two output directories hold the same config and the same tensors, bit for bit."""
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ta, tb = read_tensors(a), read_tensors(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def load_hf(cls: type, out: Path) -> torch.nn.Module:
    """`cls.from_pretrained(out)`, asserting that every tensor was found and used."""
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|."""
    return ((a - b).abs().max() / a.abs().max()).item()


def set_moe(**changes):
    """An `alter(plan, config)` replacing some MoE settings of the plan (validated again)."""
    return lambda plan, config: plan.set_routing(MoEConfig(**{**plan.moe.to_dict(), **changes}))


def assert_refuses(fmt_name: str, moe: torch.nn.Module, alter, reason: str) -> None:
    """The format accepts `moe`'s plan but, after `alter(plan, config)` (on copies), refuses it
    with a one-line reason containing `reason`; with `alter` None the plan itself is refused."""
    fmt = get_format(fmt_name)
    plan, config = copy.deepcopy(moe.sparsify_plan), copy.deepcopy(moe.config)
    if alter is not None:
        assert fmt.explain(plan, config) is None
        alter(plan, config)
    why = fmt.explain(plan, config)
    assert why is not None and reason in why and "\n" not in why, why
