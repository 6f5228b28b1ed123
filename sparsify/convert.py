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
from .io.tensor_names import TensorNames
from .io.sources import FINGERPRINT, Source, fingerprint_files, load_source, resolve_source, skeleton_of
from .merge import ModuleWeights, check_compatible, open_sources
from .model_recipe import Recipe
from .passes.init_router import check_router_data
from .prompts import prompt_set
from .api import record_architecture, upcycle_passes
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
    """Fingerprints of the source files, computed beside the conversion (xxhash releases the GIL);
    `more` holds the files of the expert sources by name, hashed after the base's, one at a time."""

    def __init__(self, files: list[Path], more: dict[str, list[Path]] | None = None):
        super().__init__(daemon=True)
        self.files, self.more, self.result, self.results, self.error = files, more or {}, {}, {}, None

    def run(self) -> None:
        try:
            self.result = fingerprint_files(self.files)
            self.results = {name: fingerprint_files(files) for name, files in self.more.items()}
        except OSError as err:
            self.error = err


def convert(
    source: str | nn.Module,
    out: str | Path,
    experts: int | None = None,
    top_k: int | None = None,
    router: str | None = None,
    normalize: bool | None = None,
    every: int | None = None,
    layers: Sequence[int] | None = None,
    capacity_factor: float | None = None,
    noise: float | None = None,
    seed: int | None = None,
    router_init_std: float | None = None,
    format: str = "auto",
    dtype: str | None = None,
    shard_size: int | str = "5GB",
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    example_inputs: tuple | None = None,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    recipe: Any = None,
    tokenizer: Any = None,
    **scheme: Any,
) -> ConversionReport:
    """Upcycle `source` and write it to `out` in `format`; returns what was done.

    The MoE options (experts ... router_init_std, and in `scheme` the other keys of a recipe:
    drop_ratio, granularity, shared_fraction, split, router_init, experts_from, merge_base,
    prompts, calibration, ...) replace the top-level keys of `recipe` (a `sparsify.Recipe`, its
    mapping or a recipe file); None means not given. Experts from other checkpoints
    (`experts_from`, `merge_base`) are opened and checked against the source before anything is
    written, and streamed like it (`sparsify.merge`); `prompts` and `calibration` feed
    data-derived routers (`passes.InitRouter`; `tokenizer` where the source has none).
    `progress(stage, done, total)` is called as work advances (stage "write": bytes). `dry_run`
    plans, chooses the format and sizes the output, and writes nothing. A source tensor holding
    NaN or Inf is refused by name unless `allow_nonfinite`, and a `dtype` that a weight overflows
    is refused by name."""
    if every is not None and layers is not None:
        raise OptionError("give either --every or --layers, not both")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise OptionError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    # Validate the options before any slow work (format defaults may still fill gaps).
    recipe = Recipe.build(recipe, experts=experts, top_k=top_k, router=router, normalize=normalize, every=every,
                          layers=list(layers) if layers is not None else None, capacity_factor=capacity_factor,
                          noise=noise, seed=seed, router_init_std=router_init_std, **scheme)
    from .io.safetensors_io import parse_size

    parse_size(shard_size)
    check_router_data(set(recipe.given("router_init")), recipe.prompts, recipe.calibration)
    if recipe.prompts is not None:
        prompt_set(recipe.prompts)  # a damaged prompts file is refused before anything is loaded
    experts_from = [n for names in recipe.given("experts_from") for n in names]
    opened = open_sources(list(dict.fromkeys(experts_from))) if experts_from else {}
    resolved = resolve_source(source) if not isinstance(source, nn.Module) else None
    sources = [resolved.path if resolved else None, *(s.path for s in opened.values())]
    out = check_output(out, force, sources, kind="dir")  # never onto, around or into a source
    report = progress or (lambda *a: None)

    report("load", 0, 1)
    ckpt: TensorNames | None = None
    if resolved is None:
        model, src = source, Source(type(source).__name__, "module")
        record_architecture(model)
    else:
        src = resolved
        if src.path is not None and ((src.path / "sparsify.json").exists() or (src.path / "sparsify.json").is_symlink()):
            raise SourceError(f"'{src.spec}' is already an MoE model written by sparsify (it has a sparsify.json); "
                              "upcycle its dense source instead, or load it with sparsify.load")
        if src.kind == "demo":
            model, src = load_source(src)
        else:
            model, ckpt = skeleton_of(src)
    for s in opened.values():  # expert checkpoints read by the dense model's names too
        if isinstance(s.weights, Checkpoint):
            s.weights = TensorNames(s.weights, model)
    if opened:
        check_compatible(model, ckpt if ckpt is not None else ModuleWeights(model), src.path, opened)
    hasher = _Hasher([] if dry_run else src.files, {} if dry_run else {name: s.files for name, s in opened.items()})
    hasher.start()
    dense_params = _dense_param_count(model)

    config = getattr(model, "config", None)
    recipe = recipe.with_defaults(format_defaults(format, config))

    report("plan", 0, 1)
    passes = upcycle_passes(recipe, sources=opened, tokenizer=tokenizer)
    result = PassManager(passes).run(model, example_inputs=example_inputs, weights=ckpt)
    plan, model = result.plan, result.model
    fmt, reason = choose_format(format, plan, config)

    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    tensors_from: TensorSource = (
        SourceTensors(ckpt, plan, model, out_dtype, {n: s.weights for n, s in opened.items()},
                      allow_nonfinite=allow_nonfinite) if ckpt is not None
        else ModelTensors(model, out_dtype)
    )
    tensors = fmt.tensors(model, plan, tensors_from)
    total = sum(t.nbytes for t in tensors)
    why = plan.why_not_preserving()
    if dry_run:
        return ConversionReport(out, plan, fmt.name, reason, ckpt is not None, dense_params, total, why, dry_run=True)

    def manifest() -> dict[str, Any]:
        # Only sparsify.json, written last, records the sources' fingerprints: hashing them goes
        # on beside the whole write instead of holding it up.
        hasher.join()
        if hasher.error is not None:
            err = hasher.error
            raise SourceError(f"could not read '{err.filename}' to record its fingerprint ({err.strerror or err}); "
                              "check that the source stays readable while sparsify runs")
        provenance = {"spec": src.spec, "kind": src.kind, FINGERPRINT: hasher.result}
        plan.source = provenance
        for name, s in opened.items():
            plan.sources[name] = s.provenance(hasher.results.get(name) if s.files else None)
        return NativeFormat.manifest(model, plan, provenance)

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


