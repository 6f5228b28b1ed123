"""Checkpoints written while training stay sparsify outputs.

`transformers.Trainer` saves a model with `model.save_pretrained(dir)`. The class's own method
would write a native model as its dense class's checkpoint with unknown MoE tensors, which neither
transformers nor `sparsify.load` can read; so an upcycled model's `save_pretrained` writes the
native format (`sparsify.save`) instead. A model in a Hugging Face MoE format keeps the class's
method and gets its `sparsify.json` written beside it, so that both transformers and
`sparsify.load` read the checkpoint.

Unlike `sparsify.save`, `save_pretrained` writes into a directory that may already hold other
files (the Trainer's optimizer state, a final `save_model` into the output directory that holds
the checkpoints): it replaces only the model's own files, as transformers' method does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import OptionError, PlanError
from ..formats.base import MANIFEST
from ..formats.native import INDEX, NativeFormat

__all__ = ["prepare_checkpoints", "save_native_pretrained"]

# Weight files of an earlier save that a new one replaces (transformers' names and ours).
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_STAGING = ".sparsify-save"


def prepare_checkpoints(model: nn.Module, format_name: str | None = None) -> nn.Module:
    """Make `model.save_pretrained` write a checkpoint that `sparsify.load` reads: the native format
    for a native model (`format_name` None or native), the class's format plus `sparsify.json`
    for a Hugging Face format. Needs `model.sparsify_plan`; returns `model`."""
    if not hasattr(type(model), "save_pretrained") or getattr(model, "sparsify_plan", None) is None:
        return model
    # An instance attribute shadows the class's method for this model only.
    object.__setattr__(model, "save_pretrained", _SavePretrained(model, format_name or NativeFormat.name))
    return model


class _SavePretrained:
    """`model.save_pretrained` of a prepared model (an object rather than a bound function, so
    that a pickled model unpickles with it)."""

    def __init__(self, model: nn.Module, format_name: str) -> None:
        self.model, self.format_name = model, format_name

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if self.format_name == NativeFormat.name:
            return save_native_pretrained(self.model, save_directory, *args, **kwargs)
        return _save_hf_pretrained(self.model, self.format_name, save_directory, *args, **kwargs)


def save_native_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """`save_pretrained` of an upcycled model: the native format (config.json, sparsify.json with
    the plan, safetensors shards and index) written into `save_directory`, replacing an earlier
    save's model files and leaving every other file there. The signature is transformers'; the
    other keyword arguments it takes (safe_serialization, variant, ...) have no effect here."""
    if push_to_hub:
        raise OptionError("save_pretrained(push_to_hub=True) is not supported for an upcycled model; "
                          "save it, then upload the directory with huggingface_hub")
    if not is_main_process:
        return
    if state_dict is not None:
        _check_state_dict(model, state_dict)
    from ..api import save

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / _STAGING
    if staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    save(model, staging, shard_size=max_shard_size)
    try:
        _move_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_state_dict(model: nn.Module, state_dict: dict) -> None:
    # The writer reads the model's own tensors. A state_dict that is not the model's, shape for
    # shape (FSDP or ZeRO-3 shards the parameters and gathers them into it), would be ignored.
    own = model.state_dict()
    for name, t in state_dict.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise PlanError(f"save_pretrained got a state_dict whose '{name}' is {tuple(t.shape)} but the model's is "
                            f"{tuple(own[name].shape)}; an upcycled model is saved from its own, unsharded tensors")


def _move_into(staging: Path, directory: Path) -> None:
    """Move a complete native output's files into `directory`: weights first, sparsify.json last
    (so a directory with a sparsify.json has every file it names), then drop stale weight files."""
    new = {p.name for p in staging.iterdir()}
    late = [INDEX, "config.json", MANIFEST]
    for name in sorted(new - set(late)) + [n for n in late if n in new]:
        os.replace(staging / name, directory / name)
    for p in directory.iterdir():
        if _WEIGHT_FILE.fullmatch(p.name) and p.name not in new:
            p.unlink()
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_hf_pretrained(model: nn.Module, format_name: str, save_directory: str | os.PathLike, *args: Any,
                        is_main_process: bool = True, **kwargs: Any) -> Any:
    """The class's `save_pretrained`, then the `sparsify.json` that makes `sparsify.load` read it."""
    result = type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        source = getattr(model, "sparsify_source", None) or {}
        provenance = model.sparsify_plan.source or (source if isinstance(source, dict) else source.describe())
        manifest = {"format": format_name, **NativeFormat.manifest(model, model.sparsify_plan, provenance)}
        (Path(save_directory) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return result
