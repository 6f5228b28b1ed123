"""The one-call public API: upcycle, save, load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from .errors import OptionError, PlanError
from .formats.native import NativeFormat, load_native
from .formats.registry import load_hf_output, output_format
from .formats.tensors import ModelTensors
from .io.sources import Source, load_source
from .passes import FindFFN, FuseDispatchCombine, PassManager, SelectLayers, UpcycleFFN
from .plan import UpcyclePlan

__all__ = ["upcycle", "upcycle_with_plan", "upcycle_passes", "save", "load", "record_architecture"]


def record_architecture(model: nn.Module) -> None:
    """Name `model`'s class in its config's `architectures` when nothing does (a model built
    directly from a config), as transformers' `save_pretrained` does, so that loading the
    written config builds the same class."""
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]


def upcycle_passes(every: int | None, layers: Sequence[int] | None, **upcycle_options: Any) -> list:
    """The find-ffn / select-layers / upcycle-ffn pipeline for these options (validated now)."""
    return [FindFFN(), SelectLayers(every=every if layers is None else None, layers=layers),
            UpcycleFFN(**upcycle_options)]


def upcycle_with_plan(
    model: nn.Module | str,
    experts: int = 8,
    top_k: int | None = 2,
    every: int | None = 2,
    layers: Sequence[int] | None = None,
    router: str = "topk",
    normalize: bool = True,
    capacity_factor: float | None = None,
    noise: float = 0.0,
    router_init_std: float = 0.02,
    seed: int = 0,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    source: Source | None = None,
    backend: str = "auto",
    **moe_options: Any,
) -> tuple[nn.Module, UpcyclePlan, Source]:
    """`upcycle`, also returning the plan and the resolved source."""
    if every is not None and layers is not None and every != 2:
        raise OptionError("give either --every or --layers, not both")
    # Validate every option before the (possibly slow) load.
    pipeline = upcycle_passes(every, layers, experts=experts, top_k=top_k, router=router, normalize=normalize,
                              noise=noise, router_init_std=router_init_std, seed=seed,
                              capacity_factor=capacity_factor, **moe_options)
    fuse = FuseDispatchCombine(backend)
    if isinstance(model, (str, Path)):
        model, source = load_source(str(model))
    elif source is None:
        source = Source(type(model).__name__, "module")
    result = PassManager([*pipeline, fuse]).run(
        model, example_inputs=example_inputs, example_kwargs=example_kwargs
    )
    result.plan.source = source.describe()
    result.model.sparsify_plan = result.plan
    result.model.sparsify_source = source
    return result.model, result.plan, source


def upcycle(model: nn.Module | str, experts: int = 8, top_k: int | None = 2, every: int | None = 2, **options: Any) -> nn.Module:
    """Turn a dense model into an MoE model whose experts start as copies of its FFNs.

    `model` is an `nn.Module` or a source string (a local directory, a hub id, `demo:NAME`).
    Within each stack, FFN number j becomes MoE when `j % every == every - 1`, or when j is in
    `layers=[...]`. Routing: `router` (topk | switch | expert-choice), `normalize`,
    `capacity_factor`. Initialisation (see `sparsify.recipe`): `noise`, `drop_ratio`
    (Drop-Upcycling), `granularity` (granular upcycling), `shared_fraction` (a shared expert),
    `split` (parameter-neutral), `router_init_std`, `seed`. `backend` picks the MoE kernels
    (auto | reference | cpu | triton); `example_inputs=(x,)` serves a module whose inputs cannot
    be made from a Hugging Face config. Returns the rewritten module (its plan is
    `module.sparsify_plan`).
    """
    return upcycle_with_plan(model, experts=experts, top_k=top_k, every=every, **options)[0]


def save(model: nn.Module, out: str | Path, force: bool = False, shard_size: int | str = "5GB") -> Path:
    """Write an upcycled model to directory `out` in the native format (atomically)."""
    plan = getattr(model, "sparsify_plan", None)
    if not isinstance(plan, UpcyclePlan):
        raise PlanError("this model was not made by sparsify.upcycle or sparsify.load; nothing says how it was converted")
    if getattr(model, "config", None) is None:
        raise PlanError(f"{type(model).__name__} has no Hugging Face config; the native format needs one to rebuild the model")
    record_architecture(model)
    source = getattr(model, "sparsify_source", None)
    provenance = plan.source or (source.describe() if isinstance(source, Source) else dict(source or {}))
    source_dir = source.path if isinstance(source, Source) else None
    fmt = NativeFormat()
    return fmt.write(out, model, plan, ModelTensors(model), fmt.manifest(model, plan, provenance),
                     source_dir=source_dir, shard_size=shard_size, force=force)


def load(path: str | Path, placement: Any = None, group: Any = None, backend: str = "auto") -> nn.Module:
    """Load a model written by `sparsify.save` / `sparsify upcycle` (no tracing is needed).

    Native outputs are rebuilt from the source architecture and the plan; outputs in a Hugging
    Face format (mixtral, qwen2-moe, switch) are loaded by their transformers class.

    Expert-parallel: with `placement` (a plan.json from `sparsify partition`, or its dict) and
    `group` (a process group or 1-D DeviceMesh; default the world), or for a directory written
    by `sparsify shard`, each rank loads only its experts and gets the whole model back with
    expert-parallel MoE layers. `backend` picks the MoE kernels (see `FuseDispatchCombine`).
    """
    from .partition.shards import is_shard_dir

    fuse = PassManager([FuseDispatchCombine(backend)])
    if placement is not None or group is not None or is_shard_dir(path):
        from .partition.loader import load_expert_parallel

        return fuse.run(load_expert_parallel(path, placement, group)).model
    fmt = output_format(path)
    if fmt is not None and fmt != NativeFormat.name:
        return load_hf_output(path)
    return fuse.run(load_native(path)).model
