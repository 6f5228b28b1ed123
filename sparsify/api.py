"""The one-call public API: upcycle, save, load."""

from __future__ import annotations

import copy as _copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn as nn

from .errors import OptionError, PlanError
from .formats.native import NativeFormat, load_native
from .formats.registry import FORMAT_NAMES, choose_format, load_hf_output, output_format
from .formats.tensors import ModelTensors
from .io.sources import Source, load_source
from .keywords import check_keywords, keyword_names, refuse_unknown_keywords
from .model_recipe import Recipe
from .passes import FindFFN, FuseDispatchCombine, PassManager, SelectLayers, UpcycleFFN
from .plan import UpcyclePlan
from .recipe_keys import ALL_KEYS
from .training import include_aux_losses, prepare_for_training

__all__ = ["upcycle", "upcycle_with_plan", "upcycle_passes", "save", "load"]


def upcycle_passes(recipe: Recipe) -> list:
    """The find-ffn / select-layers / upcycle-ffn pipeline of `recipe`."""
    return [FindFFN(), SelectLayers(recipe=recipe), UpcycleFFN(recipe=recipe)]


def upcycle_with_plan(
    model: nn.Module | str,
    experts: int | None = None,
    top_k: int | None = None,
    every: int | None = None,
    layers: Sequence[int] | None = None,
    recipe: Any = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    source: Source | None = None,
    backend: str = "auto",
    copy: bool = True,
    **options: Any,
) -> tuple[nn.Module, UpcyclePlan, Source]:
    """`upcycle`, also returning the plan and the resolved source."""
    check_keywords("sparsify.upcycle_with_plan", [k for k, v in options.items() if not isinstance(v, Mapping)],
                   _upcycle_keywords())
    if every is not None and layers is not None:
        raise OptionError("give either every or layers, not both")
    # Validate every option before the (possibly slow) load.
    recipe = Recipe.build(recipe, experts=experts, top_k=top_k, every=every,
                          layers=list(layers) if layers is not None else None, **options)
    fuse = FuseDispatchCombine(backend)
    if isinstance(model, (str, Path)):
        model, source = load_source(str(model))
    else:
        if copy:
            model = _copy_module(model)
        if source is None:
            source = Source(type(model).__name__, "module")
    result = PassManager([*upcycle_passes(recipe), fuse]).run(
        model, example_inputs=example_inputs, example_kwargs=example_kwargs
    )
    result.plan.source = source.describe()
    result.model.sparsify_plan = result.plan
    result.model.sparsify_source = source
    return prepare_for_training(result.model), result.plan, source


def upcycle(model: nn.Module | str, experts: int | None = None, top_k: int | None = None, every: int | None = None,
            recipe: Any = None, **options: Any) -> nn.Module:
    """Turn a dense model into an MoE model whose experts start as copies of its FFNs.

    `model` is an `nn.Module` or a source string (a local directory, a hub id, `demo:NAME`).
    `experts` (default 8) per MoE layer, `top_k` (default 2; 1 for switch). Within each stack,
    FFN number j becomes MoE when `j % every == every - 1` (default every=2), or when j is in
    `layers=[...]`. Routing: `router` (topk | switch | expert-choice), `normalize`,
    `capacity_factor`. Initialisation (see `sparsify.recipe`): `noise`, `drop_ratio`
    (Drop-Upcycling), `granularity` (granular upcycling), `shared_fraction` (a shared expert),
    `split` (parameter-neutral), `router_init_std`, `seed`. `recipe` (a `sparsify.Recipe`, its
    mapping or a YAML recipe file) sets all of these per stack and per layer; keywords given
    beside it replace its top-level keys, and a keyword holding a mapping is a stack or module
    section (`decoder={"top_k": 2}`). `backend` picks the MoE kernels (auto | reference | cpu |
    triton); `example_inputs=(x,)` serves a module whose inputs cannot be made from a Hugging
    Face config; the MoE layer's training settings are `jitter`, `aux_loss_coef`, `z_loss_coef`,
    `router_dtype`. In training mode the loss the model returns includes the routers' weighted
    balancing and z losses, and its `save_pretrained` writes the native format (see
    `sparsify.training`).

    An `nn.Module` is left as it was: the MoE model is a copy (`copy=False` rewrites the module
    in place instead and returns it, which saves holding its non-FFN weights twice). Returns
    the MoE model; its plan is `model.sparsify_plan`. Unknown keywords are refused by name.
    """
    check_keywords("sparsify.upcycle", [k for k, v in options.items() if not isinstance(v, Mapping)],
                   _upcycle_keywords())
    return upcycle_with_plan(model, experts=experts, top_k=top_k, every=every, recipe=recipe, **options)[0]


def _copy_module(model: nn.Module) -> nn.Module:
    try:
        return _copy.deepcopy(model)
    except Exception as err:  # modules holding unpicklable state (locks, handles) cannot be copied
        raise OptionError(f"cannot copy {type(model).__name__} ({type(err).__name__}: {err}); pass copy=False to "
                          "upcycle it in place") from None


@refuse_unknown_keywords
def save(model: nn.Module, out: str | Path, format: str = "native", force: bool = False,
         shard_size: int | str = "5GB") -> Path:
    """Write an upcycled model to directory `out` (atomically), in the format the CLI's
    `--format` names: native (the default; any plan, `sparsify.load` reads it), mixtral,
    qwen2-moe, switch (Hugging Face formats, where the plan fits them), or auto (a Hugging Face
    format where one fits and keeps the model's meaning, else native).
    A format that cannot express the model is refused with the reason."""
    if format not in FORMAT_NAMES:
        raise OptionError(f"format must be one of {', '.join(FORMAT_NAMES)}, got {format!r}")
    plan = getattr(model, "sparsify_plan", None)
    if not isinstance(plan, UpcyclePlan):
        raise PlanError("this model was not made by sparsify.upcycle or sparsify.load; nothing says how it was converted")
    if getattr(model, "config", None) is None:
        raise PlanError(f"{type(model).__name__} has no Hugging Face config; the native format needs one to rebuild the model")
    source = getattr(model, "sparsify_source", None)
    provenance = plan.source or (source.describe() if isinstance(source, Source) else dict(source or {}))
    source_dir = source.path if isinstance(source, Source) else None
    try:
        fmt, _ = choose_format(format, plan, model.config)
    except OptionError as err:  # the registry speaks of the CLI's --format
        raise OptionError(str(err).replace(f"--format {format}", f"format={format!r}", 1)) from None
    return fmt.write(out, model, plan, ModelTensors(model), NativeFormat.manifest(model, plan, provenance),
                     source_dir=source_dir, shard_size=shard_size, force=force,
                     # neither the dense source nor the output the model was loaded from may be written over
                     sources=[getattr(model, "sparsify_loaded_from", None)])


@refuse_unknown_keywords
def load(path: str | Path, placement: Any = None, group: Any = None, backend: str = "auto") -> nn.Module:
    """Load a model written by `sparsify.save` / `sparsify upcycle` (no tracing is needed).

    Native outputs are rebuilt from the source architecture and the plan; outputs in a Hugging
    Face format (mixtral, qwen2-moe, switch) are loaded by their transformers class.

    Expert-parallel: with `placement` (a plan.json from `sparsify partition`, or its dict) and
    `group` (a process group or 1-D DeviceMesh; default the world), or for a directory written
    by `sparsify shard`, each rank loads only its experts and gets the whole model back with
    expert-parallel MoE layers. `backend` picks the MoE kernels (see `FuseDispatchCombine`).
    In training mode the loss the model returns includes its router losses, and `save_pretrained`
    writes a checkpoint this function reads again (see `sparsify.training`).
    """
    from .partition.shards import is_shard_dir

    fuse = PassManager([FuseDispatchCombine(backend)])
    if placement is not None or group is not None or is_shard_dir(path):
        from .partition.loader import load_expert_parallel

        return include_aux_losses(fuse.run(load_expert_parallel(path, placement, group)).model)
    fmt = output_format(path)
    if fmt is not None and fmt != NativeFormat.name:
        return prepare_for_training(load_hf_output(path), fmt)
    return prepare_for_training(fuse.run(load_native(path)).model)


def _upcycle_keywords() -> list[str]:
    """Every keyword `upcycle` takes: its own and `upcycle_with_plan`'s, and every recipe key
    (the options of an MoE layer, the selection, the whole conversion's settings)."""
    names = [n for n in keyword_names(upcycle_with_plan) if n != "model"]
    return names + [k for k in ALL_KEYS if k not in names]
