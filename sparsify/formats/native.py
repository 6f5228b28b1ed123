"""The native format: the source config, the plan, and sharded safetensors.

    OUT/config.json                      the source model's config, unchanged
    OUT/sparsify.json                    plan, options, provenance (source, sha256, version)
    OUT/model-0000i-of-0000n.safetensors the converted model's tensors
    OUT/model.safetensors.index.json     tensor -> shard
    OUT/tokenizer files                  copied from the source when it has them

Tied tensors are stored once (aliases listed in sparsify.json), and non-persistent buffers
(rotary tables, masks) are stored too, so loading needs neither tracing nor re-initialisation:
the architecture is built on the meta device, the plan applied, and every tensor assigned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PlanError, SourceError
from ..io.atomic import atomic_directory
from ..io.sources import TOKENIZER_FILES
from ..plan import UpcyclePlan
from ..rewrite import apply_plan

__all__ = ["save_native", "load_native", "read_manifest", "MANIFEST", "INDEX"]

MANIFEST = "sparsify.json"
INDEX = "model.safetensors.index.json"
FORMAT_NAME = "sparsify-native"


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage are stored once; returns (unique tensors, alias -> stored name)."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous()
    return unique, aliases


def save_native(
    model: nn.Module,
    out: str | Path,
    plan: UpcyclePlan,
    provenance: dict[str, Any],
    source_dir: Path | None = None,
    shard_size: int | str = "5GB",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `model` (converted by `plan`) to directory `out`, atomically."""
    config = getattr(model, "config", None)
    if config is None:
        raise PlanError(f"{type(model).__name__} has no Hugging Face config; the native format needs one to rebuild the model")
    state = dict(model.state_dict())
    buffers = _non_persistent_buffers(model)
    state.update(buffers)
    unique, aliases = _dedupe(state)
    split = split_torch_state_dict_into_shards(unique, filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
    shards = list(split.filename_to_tensors.items())
    n = len(shards)
    names = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, (old, _) in enumerate(shards)}
    with atomic_directory(out, force=force) as tmp:
        config.to_json_file(tmp / "config.json")
        weight_map = {}
        for i, (old, keys) in enumerate(shards):
            save_file({k: unique[k] for k in keys}, tmp / names[old], metadata={"format": "pt"})
            weight_map.update({k: names[old] for k in keys})
            if progress:
                progress(i + 1, n)
        total = sum(t.numel() * t.element_size() for t in unique.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        from .. import __version__

        manifest = {
            "format": FORMAT_NAME,
            "sparsify_version": __version__,
            "plan": plan.to_dict(),
            "source": provenance,
            "aliases": aliases,
            "buffers": sorted(buffers),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, tmp / name)
    return Path(out)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The `sparsify.json` of an upcycled directory."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SourceError(f"'{path}' has no {MANIFEST}; it is not a model written by sparsify") from None
    except json.JSONDecodeError as err:
        raise SourceError(f"'{path / MANIFEST}' is not valid JSON ({err.msg}); the output is damaged") from None
    if manifest.get("format") != FORMAT_NAME:
        raise SourceError(f"'{path / MANIFEST}' is not a sparsify-native manifest")
    return manifest


def _read_shards(path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads((path / INDEX).read_text())
    except FileNotFoundError:
        raise SourceError(f"'{path}' has no {INDEX}; the output is incomplete") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        f = path / shard
        if not f.is_file():
            raise SourceError(f"shard '{shard}' listed in {INDEX} is missing from '{path}'")
        try:
            loaded = load_file(f)
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read '{f}' ({err}); the file is truncated or corrupt") from None
        # safetensors aligns tensors to 8 bytes only; BLAS takes other code paths (other rounding)
        # on such data, so re-allocate to make a loaded model compute exactly as the saved one did.
        tensors.update({k: t if t.data_ptr() % 64 == 0 else t.clone() for k, t in loaded.items()})
    return tensors


def load_native(path: str | Path) -> nn.Module:
    """Rebuild a model written by `save_native`: architecture on meta, plan applied, weights assigned."""
    import transformers

    path = Path(path)
    manifest = read_manifest(path)
    plan = UpcyclePlan.from_dict(manifest["plan"])
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SourceError(f"config.json of '{path}' names no transformers architecture ({arch!r}); cannot rebuild it")
    with torch.device("meta"):
        model = cls(config)
    apply_plan(model, plan, copy_weights=False)
    tensors = _read_shards(path)
    for alias, stored in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[stored]
    buffer_names = set(manifest.get("buffers", []))
    persistent = {k: v for k, v in tensors.items() if k not in buffer_names}
    result = model.load_state_dict(persistent, strict=False, assign=True)
    if result.unexpected_keys:
        raise PlanError(f"'{path}' holds tensor '{result.unexpected_keys[0]}' that the plan's model lacks; the plan does not match the weights")
    for name in buffer_names:
        mod_name, _, buf = name.rpartition(".")
        model.get_submodule(mod_name)._buffers[buf] = tensors[name]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise SourceError(f"'{path}' lacks tensor '{left[0]}' ({len(left)} in all); the output is incomplete")
    model.eval()
    model.sparsify_plan = plan
    model.sparsify_source = manifest.get("source", {})
    return model
