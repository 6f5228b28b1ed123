"""The native format: the source config, the plan, and sharded safetensors.

    OUT/config.json                      the source model's config, its model_type replaced by a
                                         marker that plain transformers refuses (naming sparsify.load),
                                         the source's kept under "sparsify_source_model_type"
    OUT/sparsify.json                    plan, options, provenance (source and its fingerprints, version)
                                         and the layout digest (see layout_digest.py)
    OUT/model-0000i-of-0000n.safetensors the converted model's state dict (experts stacked)
    OUT/model.safetensors.index.json     tensor -> shard
    OUT/tokenizer files                  copied from the source when it has them

Tied tensors are stored once (aliases listed in sparsify.json). Loading builds the source
architecture with meta parameters (buffers are derived from the config), applies the plan, and
assigns every tensor: no tracing, no random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import PlanError, SourceError
from ..io.checkpoint import read_index
from ..io.paths import regular_file
from ..io.tensor_names import TensorDict, TensorNames
from ..io.safetensors_io import OutputTensor
from ..io.skeleton import build_skeleton, model_class
from ..plan import UpcyclePlan
from ..rewrite import apply_plan
from .base import OutputFormat
from .manifest import MANIFEST, NATIVE_FORMAT, plan_of, read_output_manifest
from .tensors import TensorSource, alias_groups

__all__ = ["NativeFormat", "load_native", "assign_tensors", "read_manifest", "read_config", "apply_stored_plan", "MANIFEST", "INDEX", "FORMAT_NAME",
           "NATIVE_MODEL_TYPE", "SOURCE_MODEL_TYPE", "native_config_view"]

INDEX = "model.safetensors.index.json"
FORMAT_NAME = NATIVE_FORMAT
# What plain transformers prints: "has model type `<this>` but Transformers does not recognize it".
NATIVE_MODEL_TYPE = "sparsify-native: load it with sparsify.load"
SOURCE_MODEL_TYPE = "sparsify_source_model_type"


class NativeFormat(OutputFormat):
    """sparsify's own format: any plan, any architecture; `sparsify.load` reads it."""

    name = FORMAT_NAME
    description = "native (source config + plan + stacked experts; sparsify.load reads it)"
    records_layout = True

    def config_dict(self, plan: UpcyclePlan, config: Any) -> dict[str, Any]:
        # transformers would otherwise load this directory as the dense source, with the converted
        # FFNs freshly initialised and only its load report to say so; the marker makes
        # AutoConfig/AutoModel refuse it with a message that names sparsify.load.
        d = config.to_dict()
        d[SOURCE_MODEL_TYPE] = d.get("model_type", getattr(config, "model_type", ""))
        d["model_type"] = NATIVE_MODEL_TYPE
        return d

    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        moe_tensors: dict[str, tuple] = {}
        for site in plan.selected_sites:
            layer = plan.layer(site)
            moe_tensors[f"{site.path}.router.weight"] = (site, "router", None)
            for role in site.weights:
                moe_tensors[f"{site.path}.experts.{role}"] = (site, role, range(layer.moe.num_experts))
                if layer.shared is not None:
                    moe_tensors[f"{site.path}.shared.{role}"] = (site, role, "shared")
        out: list[OutputTensor] = []
        groups = alias_groups(model)
        for name, t in model.state_dict(keep_vars=True).items():
            if groups[name][0] != name:
                continue  # a tied tensor: stored once, under its first name
            shape = tuple(t.shape)
            if name in moe_tensors:
                site, role, which = moe_tensors[name]
                if role == "router":
                    out.append(OutputTensor(name, torch.float32, shape, lambda s=site: [source.router(s)]))
                elif which == "shared":
                    out.append(OutputTensor(name, source.expert_dtype(site, role), shape,
                                            lambda s=site, r=role: [source.expert(s, r, "shared")]))
                else:
                    out.append(OutputTensor(name, source.expert_dtype(site, role), shape,
                                            lambda s=site, r=role, es=which: (source.expert(s, r, i) for i in es)))
            else:
                out.append(OutputTensor(name, source.plain_dtype(name), shape, lambda n=name: [source.plain(n)]))
        return out

    @staticmethod
    def manifest(model: nn.Module, plan: UpcyclePlan, provenance: dict[str, Any]) -> dict[str, Any]:
        """The sparsify.json content (less the format name)."""
        from .. import __version__

        groups = alias_groups(model)
        aliases = {n: names[0] for n, names in groups.items() if names[0] != n}
        return {"sparsify_version": __version__, "plan": plan.to_dict(), "source": provenance, "aliases": aliases}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated `sparsify.json` of a native output directory (file sizes checked)."""
    path = Path(path)
    manifest = read_output_manifest(path)
    if manifest["format"] != FORMAT_NAME:
        raise SourceError(f"'{path}' is in the {manifest['format']!r} format; load it with transformers")
    return manifest


def _read_shards(path: Path) -> dict[str, torch.Tensor]:
    index = path / INDEX
    if not (index.exists() or index.is_symlink()):
        raise SourceError(f"'{path}' has no {INDEX}; the output is incomplete")
    weight_map = read_index(index, str(path), fix="write the output again")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        f = path / shard
        if not (f.exists() or f.is_symlink()):
            raise SourceError(f"shard '{shard}' listed in {INDEX} is missing from '{path}'")
        regular_file(f, "weights file")
        try:
            loaded = load_file(f)
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read '{f}' ({err}); the file is truncated or corrupt") from None
        # safetensors aligns tensors to 8 bytes only; BLAS takes other code paths (other rounding)
        # on such data, so re-allocate to make a loaded model compute exactly as the saved one did.
        tensors.update({k: t if t.data_ptr() % 64 == 0 else t.clone() for k, t in loaded.items()})
    return tensors


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path) -> None:
    """Assign `tensors` (stored names; aliases per the manifest) to a skeleton with the plan
    applied, tie weights, and refuse anything unexpected or missing."""
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise SourceError(f"'{path / MANIFEST}' has a damaged 'aliases' entry; the output is damaged, write it again")
    for alias, stored in aliases.items():
        if stored not in tensors:
            raise SourceError(f"'{path}' lacks tensor '{stored}' that '{alias}' is tied to; the checkpoint is incomplete")
        tensors[alias] = tensors[stored]
    # Stored names as transformers maps them onto modules (an output written where the source
    # family saved other names, or by another transformers version, still loads).
    names = TensorNames(TensorDict(tensors, path), model)
    if names.unexpected:
        raise PlanError(f"'{path}' holds tensor '{names.unexpected[0]}' that the plan's model lacks; "
                        "the plan does not match the weights")
    tensors = {n: names.read(n) for n in names.names()}
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches: the plan says other shapes than the weights have
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise PlanError(f"the weights of '{path}' do not fit its plan ({detail[:200]}); "
                        "sparsify.json or the weights were changed, write the output again") from None
    if result.unexpected_keys:
        raise PlanError(f"'{path}' holds tensor '{result.unexpected_keys[0]}' that the plan's model lacks; "
                        "the plan does not match the weights")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise SourceError(f"'{path}' lacks tensor '{left[0]}' ({len(left)} in all); the checkpoint is incomplete")


def load_native(path: str | Path) -> nn.Module:
    """Rebuild a model written in the native format: skeleton, plan applied, weights assigned."""
    path = Path(path)
    manifest = read_manifest(path)
    plan = plan_of(manifest, path / MANIFEST)
    config = read_config(path)
    model = build_skeleton(config, model_class(config))
    apply_stored_plan(model, plan, path)
    assign_tensors(model, _read_shards(path), manifest, path)
    model.eval()
    model.sparsify_plan = plan
    model.sparsify_source = manifest.get("source", {})
    model.sparsify_loaded_from = path
    return model


def apply_stored_plan(model: nn.Module, plan: UpcyclePlan, path: Path) -> nn.Module:
    """`apply_plan` for a plan read from `path`: a plan that does not fit the architecture (an
    edited sparsify.json) is a one-line error."""
    from ..errors import SparsifyError

    try:
        return apply_plan(model, plan, copy_weights=False)
    except SparsifyError:
        raise
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError) as err:
        detail = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        raise PlanError(f"the plan in '{path / MANIFEST}' does not fit the model of its config.json ({detail}); "
                        "the output is damaged, write it again") from None


def native_config_view(data: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict as the source model's: a native output's model_type marker undone
    (older outputs, written without it, read the same)."""
    if data.get("model_type") != NATIVE_MODEL_TYPE:
        return data
    data = dict(data)
    data["model_type"] = data.pop(SOURCE_MODEL_TYPE, None)
    return data


def read_config(path: Path) -> Any:
    """The transformers config of an output directory (any format; a native one's model_type
    marker undone), or a one-line error. Every reader of an output's config.json calls this."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    regular_file(path / "config.json", "config file")
    try:
        data, _ = PretrainedConfig.get_config_dict(path, local_files_only=True)
        data = native_config_view(data)
        model_type = data.get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ValueError(f"model type {model_type!r} is not one transformers knows")
        return CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SourceError(f"cannot read the config of '{path}': {first}; the output is damaged, write it again") from None
