"""Conversion of a model source into an output directory: the executor behind `sparsify upcycle`.

Two paths produce the same tensors for the same plan:

- checkpoints (a directory or a hub id) are converted by streaming: the architecture is built
  with meta parameters, captured and planned there (no weight memory), and the output is written
  tensor by tensor from the source files, each expert copy from the one source buffer;
- in-memory models (demos, `nn.Module`s) are upcycled in memory and written by the same writer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import OptionError, SourceError
from .formats.native import NativeFormat
from .formats.registry import choose_format, format_defaults
from .formats.tensors import ModelTensors, SourceTensors, TensorSource
from .io.atomic import check_output
from .io.checkpoint import Checkpoint
from .io.sources import Source, load_source, resolve_source, sha256_files, skeleton_of
from .recipe import LayerRecipe
from .api import upcycle_passes
from .passes import PassManager
from .plan import UpcyclePlan

__all__ = ["ConversionReport", "convert", "DTYPE_NAMES"]

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionReport:
    """What a conversion did: the plan, the format written and why, sizes and counts."""

    out: Path
    plan: UpcyclePlan
    format: str
    format_reason: str
    streamed: bool
    dense_params: int
    bytes_written: int
    why_not_preserving: str | None = None
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False  # nothing was written; bytes_written is what would be

    @property
    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters of the output."""
        return self.plan.param_counts(self.dense_params)


def _dense_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Hasher(threading.Thread):
    """sha256 of the source files, computed beside the conversion (hashlib releases the GIL)."""

    def __init__(self, files: list[Path]):
        super().__init__(daemon=True)
        self.files, self.result, self.error = files, {}, None

    def run(self) -> None:
        try:
            self.result = sha256_files(self.files)
        except OSError as err:
            self.error = err


def convert(
    source: str | nn.Module,
    out: str | Path,
    experts: int,
    top_k: int | None = None,
    router: str | None = None,
    normalize: bool = True,
    every: int | None = None,
    layers: Sequence[int] | None = None,
    capacity_factor: float | None = None,
    noise: float = 0.0,
    seed: int = 0,
    router_init_std: float = 0.02,
    format: str = "auto",
    dtype: str | None = None,
    shard_size: int | str = "5GB",
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    example_inputs: tuple | None = None,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    **scheme: Any,
) -> ConversionReport:
    """Upcycle `source` and write it to `out` in `format`; returns what was done.

    `scheme` holds the initialisation options of `sparsify.recipe.LayerRecipe` (drop_ratio,
    granularity, shared_fraction, split, router_init). `progress(stage, done, total)` is called
    as work advances (stage "write": bytes). `dry_run` plans, chooses the format and sizes the
    output, and writes nothing. A source tensor holding NaN or Inf is refused by name unless
    `allow_nonfinite`, and a `dtype` that a weight overflows is refused by name."""
    if every is not None and layers is not None:
        raise OptionError("give either --every or --layers, not both")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise OptionError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if every is not None and every < 1:
        raise OptionError(f"--every must be 1 or more, got {every}")
    # Validate the options before any slow work (format defaults may still fill gaps).
    LayerRecipe.from_options(experts=experts, top_k=top_k if top_k is not None else (1 if router == "switch" else 2),
                             router=router or "topk", normalize=normalize, capacity_factor=capacity_factor, noise=noise,
                             router_init_std=router_init_std, **scheme)
    from .io.safetensors_io import parse_size

    parse_size(shard_size)
    out = check_output(out, force, kind="dir")
    report = progress or (lambda *a: None)

    report("load", 0, 1)
    ckpt: Checkpoint | None = None
    if isinstance(source, nn.Module):
        model, src = source, Source(type(source).__name__, "module")
    else:
        src = resolve_source(source)
        check_output(out, force, [src.path], kind="dir")  # never onto, around or into the source
        if src.path is not None and ((src.path / "sparsify.json").exists() or (src.path / "sparsify.json").is_symlink()):
            raise SourceError(f"'{src.spec}' is already an MoE model written by sparsify (it has a sparsify.json); "
                              "upcycle its dense source instead, or load it with sparsify.load")
        if src.kind == "demo":
            model, src = load_source(src)
        else:
            model, ckpt = skeleton_of(src)
    hasher = _Hasher([] if dry_run else src.files)
    hasher.start()
    dense_params = _dense_param_count(model)

    config = getattr(model, "config", None)
    implied = format_defaults(format, config)
    if top_k is None and router is None:
        top_k, router = implied.get("top_k", top_k), implied.get("router", router)
    router = router or "topk"
    top_k = top_k if top_k is not None else (1 if router == "switch" else 2)
    if every is None and layers is None:
        every = implied.get("every", 2)

    report("plan", 0, 1)
    passes = upcycle_passes(every, layers, experts=experts, top_k=top_k, router=router, normalize=normalize,
                            noise=noise, router_init_std=router_init_std, seed=seed, capacity_factor=capacity_factor,
                            **scheme)
    result = PassManager(passes).run(model, example_inputs=example_inputs)
    plan, model = result.plan, result.model
    fmt, reason = choose_format(format, plan, config)

    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    tensors_from: TensorSource = (
        SourceTensors(ckpt, plan, model, out_dtype, allow_nonfinite=allow_nonfinite) if ckpt is not None
        else ModelTensors(model, out_dtype)
    )
    tensors = fmt.tensors(model, plan, tensors_from)
    total = sum(t.nbytes for t in tensors)
    why = plan.why_not_preserving()
    if dry_run:
        return ConversionReport(out, plan, fmt.name, reason, ckpt is not None, dense_params, total, why, dry_run=True)

    hasher.join()
    provenance = {"spec": src.spec, "kind": src.kind, "sha256": hasher.result}
    plan.source = provenance
    manifest = NativeFormat.manifest(model, plan, provenance)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        report("write", done[0], total)

    fmt.write(out, model, plan, tensors_from, manifest, source_dir=src.path, shard_size=shard_size,
              force=force, progress=on_bytes, tensors=tensors)
    nonfinite = getattr(tensors_from, "nonfinite", [])
    notes = [f"source tensors holding NaN or Inf, converted as they are: {', '.join(nonfinite[:5])}"
             + (f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else "")] if nonfinite else []
    return ConversionReport(out, plan, fmt.name, reason, ckpt is not None, dense_params, total, why, notes)


