"""ONNX-native upcycling: `sparsify upcycle model.onnx --experts N -o out.onnx`.

The same find-ffn / select-layers / upcycle-ffn pipeline as for checkpoints, on the ONNX IR:

    read -> find-ffn-onnx -> select-layers -> upcycle-ffn-onnx -> clean-up [-> fuse-moe-ort] -> write
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnx_ir as ir

from .. import __version__
from ..errors import NoFFNFoundError, OptionError, SourceError
from ..formats.onnx import METADATA_KEY, external_files, read_onnx, write_onnx
from ..io.atomic import check_output
from ..model_recipe import Recipe
from ..passes.onnx.find_ffn import FindFFNOnnx
from ..passes.onnx.fuse_moe_ort import FusionReport
from ..passes.onnx.upcycle_ffn import UpcycleFFNOnnx
from ..plan import UpcyclePlan
from .export import DEFAULT_OPSET, check_export_options, lower_onnx

__all__ = ["upcycle_onnx", "OnnxUpcycleResult", "MIN_OPSET", "estimate_memory"]

# The standard-ops MoE uses ReduceSum and Unsqueeze with axes as inputs (opset 13).
MIN_OPSET = 13


@dataclass
class OnnxUpcycleResult:
    """The plan applied, what fuse-moe-ort did, and the file written."""

    plan: UpcyclePlan
    report: FusionReport
    path: Path
    dense_params: int
    total_params: int
    weight_bytes: int = 0  # of the upcycled graph's initializers
    dry_run: bool = False  # nothing was written


def _count(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def _check_opset(model: ir.Model, source: str) -> None:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if version is None or not MIN_OPSET <= version <= newest:
        raise SourceError(
            f"'{source}' uses ONNX opset {version}; ONNX-native upcycling supports opsets {MIN_OPSET} to {newest} "
            f"(convert it first with onnx.version_converter.convert_version(model, {MIN_OPSET}))"
        )


def upcycle_onnx(
    source: str | Path,
    out: str | Path,
    experts: int | None = None,
    every: int | None = None,
    layers: Sequence[int] | None = None,
    target: str = "ort",
    force: bool = False,
    dry_run: bool = False,
    recipe: Any = None,
    **options: Any,
) -> OnnxUpcycleResult:
    """Upcycle the FFNs of the ONNX model at `source` and write the result to `out`.

    `experts`, `every`, `layers`, `recipe` and `options` (top_k, router, normalize,
    capacity_factor, noise, router_init_std, seed, ...) mean what they mean for
    `sparsify.upcycle`. `target` "ort" then fuses each MoE layer ONNX Runtime supports into
    `com.microsoft.MoE`; "standard" keeps standard ops. `dry_run` does all of it in memory and
    writes nothing.
    """
    if every is not None and layers is not None:
        raise OptionError("give either --every or --layers, not both")
    recipe = Recipe.build(recipe, experts=experts, every=every, layers=list(layers) if layers is not None else None,
                          **options)  # validates the MoE options
    if any(f > 0 for f in recipe.given("shared_fraction")):
        raise OptionError("ONNX-native upcycling has no shared experts (--shared-fraction); upcycle the checkpoint instead")
    if "expert-choice" in recipe.given("router"):
        raise OptionError("--router expert-choice needs to know which layers are causal, which an ONNX graph "
                          "does not say; use topk or switch, or upcycle the checkpoint instead")
    check_export_options(target, DEFAULT_OPSET, 1, 1)
    check_output(out, force, [source], kind="file")
    model = read_onnx(source)
    check_output(out, force, [source, *external_files(model)], kind="file")  # its weights may live beside it
    _check_opset(model, str(source))
    dense_params = _count(model)

    _check_graph(source)
    find = FindFFNOnnx()
    try:
        find(model)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        # a graph the checker passes but that is not what its exporter would write (an edited node)
        detail = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        raise SourceError(f"cannot read the FFNs of '{source}' ({detail}); the graph is damaged or edited") from None
    if not find.found:
        raise NoFFNFoundError(_no_ffn_message(str(source), find.rejected))
    plan = UpcyclePlan(sites=[f.site for f in find.found], rejected=find.rejected, seed=recipe.seed)
    plan.selected, plan.selection = recipe.select(plan.sites)
    if not plan.selected:
        raise OptionError(f"no FFN layer was selected among the graph's {len(plan.sites)} FFNs; "
                          "lower --every or pass --layers")
    plan.layers = recipe.layer_plans(plan.sites, plan.selected)
    plan.recipe = recipe.to_dict(for_json=True)
    plan.source = {"spec": str(source), "kind": "onnx"}
    if not dry_run:
        _check_memory(model, plan, dense_params, str(source))

    UpcycleFFNOnnx(find.found, plan)(model)
    report = lower_onnx(model, target)
    model.metadata_props[METADATA_KEY] = json.dumps(
        {"sparsify_version": __version__, "graph": "model", "target": target, "opset": model.opset_imports.get(""),
         "plan": plan.to_dict(), "fusion": report.to_dict()}
    )
    total = _count(model)
    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if dry_run:
        return OnnxUpcycleResult(plan, report, Path(out), dense_params, total, nbytes, dry_run=True)
    (path,) = write_onnx({Path(out): model}, force=force, sources=[source])[:1]
    return OnnxUpcycleResult(plan, report, path, dense_params, total, nbytes)


def _check_graph(source: str | Path) -> None:
    """onnx.checker on the source (op schemas, input counts, types): a damaged or edited graph is
    one line before any pass reads it."""
    import math

    try:
        onnx.checker.check_model(str(source))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SourceError(f"'{source}' is not a valid ONNX model (onnx.checker: {detail})") from None
    # The checker does not compare an initializer's bytes with its dims (ONNX Runtime does, when
    # it runs the graph): an upcycled graph would copy the mismatch into every expert.
    for t in onnx.load(str(source), load_external_data=False).graph.initializer:
        if t.raw_data and t.data_location != onnx.TensorProto.EXTERNAL:
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
            if size != len(t.raw_data):
                raise SourceError(f"'{source}': initializer '{t.name}' holds {len(t.raw_data)} bytes but its shape "
                                  f"{list(t.dims)} needs {size}; the graph is damaged or edited")


# Peak memory over the upcycled graph's weights, measured: the graph is built in memory and then
# serialised (a 4.9 GB output peaked at 9.2 GB resident).
PEAK_FACTOR = 2.0
# What upcycling loads besides the weights (onnx's checker, the rewriter's rules), measured on demos.
FIXED_BYTES = 256 << 20


def estimate_memory(model: ir.Model, plan: UpcyclePlan, dense_params: int) -> tuple[int, int]:
    """(bytes of the upcycled graph's weights, estimated peak memory of upcycling it in memory)."""
    dense_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    total, _ = plan.param_counts(dense_params)
    out_bytes = int(total * dense_bytes / max(dense_params, 1))
    return out_bytes, int(PEAK_FACTOR * out_bytes) + FIXED_BYTES


def _check_memory(model: ir.Model, plan: UpcyclePlan, dense_params: int, source: str) -> None:
    # ONNX protobufs are built whole before they are written (onnx and onnx_ir have no streaming
    # writer), so a graph that cannot fit is refused before any of it is built.
    from ..io.memory import available_memory
    from ..units import format_bytes

    out_bytes, peak = estimate_memory(model, plan, dense_params)
    room = available_memory()
    if peak > room:
        raise OptionError(f"upcycling '{source}' as an ONNX graph needs about {format_bytes(peak)} of memory (its "
                          f"{format_bytes(out_bytes)} of weights are built in memory, then serialised) but "
                          f"{format_bytes(room)} is available; upcycle the checkpoint instead (streamed, bounded "
                          "memory) and export it, or use fewer experts or layers")


def _no_ffn_message(source: str, rejected) -> str:
    if not rejected:
        return (f"no FFN found in '{source}': no MatMul by a constant weight reads an activation of another "
                "(dense: x @ W1 -> act -> @ W2; gated: act(x @ Wg) * (x @ Wu) -> @ Wd)")
    reasons = "; ".join(str(r) for r in rejected[:3]) + (f"; and {len(rejected) - 3} more" if len(rejected) > 3 else "")
    return f"no FFN found in '{source}': {len(rejected)} candidate(s) rejected: {reasons}"
