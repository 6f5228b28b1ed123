"""`sparsify verify DENSE MOE`: compare outputs on the same seeded inputs (checkpoints or ONNX graphs)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from .main import command
from .options import argument
from .output import Output

__all__ = ["verify"]


@command()
def verify(
    o: Output,
    dense: Annotated[str, argument("DENSE", "The dense model (directory, hub id, demo:NAME), or a dense .onnx graph; "
                                            "alone: an output directory whose files to check.")],
    moe: Annotated[Optional[str], argument("MOE", "The upcycled model directory, or the upcycled .onnx graph.",
                                           required=False)] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", metavar="A", help="Absolute tolerance.",
                                                  show_default="1e-5 x the largest dense output")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the test inputs.")] = 0,
) -> None:
    """Check that two models give the same outputs on the same inputs.

    Exits 0 within the tolerance, 1 outside it. An upcycled directory is compared one MoE layer
    at a time, in the memory of the dense model and one layer, and each of its tensors with what
    the plan makes of the dense model. Two .onnx files are run in ONNX Runtime (CPU). Given only
    an output directory (sparsify verify OUT): checks every file against the size and sha256 its
    manifest records."""
    if moe is None:
        from ..formats.manifest import verify_output

        o.step(f"hashing the files of {dense}")
        manifest, n = verify_output(dense)
        o.emit({"command": "verify", "out": dense, "files": n, "manifest": str(manifest), "match": True})
        o.result(f"OK: {n} files of {dense} match the sizes and sha256 recorded in {manifest}", style="bold green")
        return
    from ..verify import check_atol

    check_atol(atol, "--atol")
    onnx = [spec.endswith(".onnx") for spec in (dense, moe)]
    plan, source, rtol = None, None, 1e-5
    if all(onnx):
        from ..onnx.compare import compare_onnx

        o.step("running both graphs in ONNX Runtime")
        c, runtime = compare_onnx(dense, moe, seed=seed), "onnxruntime"
        plan = _onnx_plan(moe)
    elif any(onnx):
        from ..errors import OptionError

        raise OptionError("verify compares two models or two ONNX graphs; export the model to ONNX first "
                          "(sparsify export) or pass the checkpoint of the graph")
    else:
        from ..formats.registry import output_format
        from ..io.sources import resolve_source
        from ..provenance import check_architecture, check_source
        from ..verify import lowest_precision, rtol_for, weights_dtype
        from .common import cache_note, load_any

        for note in filter(None, map(cache_note, (dense, moe))):
            o.detail(note)
        moe_src = resolve_source(moe)
        o.step(f"loading {dense}")
        ref, dense_src = load_any(dense)
        if moe_src.path is not None and output_format(moe_src.path):
            from ..streaming.output import UpcycledOutput
            from ..streaming.verify import compare_streamed

            recorded = UpcycledOutput.open(moe_src.path)
            plan = recorded.plan
            source = check_source(recorded.manifest.get("source"), dense_src)
            o.detail(source.line)
            check_architecture(ref, plan, dense, _source_model_type(recorded))
            ckpt = recorded.checkpoint  # stored dtypes, from the headers (the output is streamed, not loaded)
            dtype = lowest_precision([weights_dtype(ref), *(ckpt.dtype(n) for n in ckpt.names())])
            # one MoE layer's experts in memory at a time, beside the dense model
            c, runtime = compare_streamed(ref, moe_src.path, seed=seed, progress=o.step), "torch"
        else:
            from ..verify import compare

            o.step(f"loading {moe}")
            cand, _ = load_any(moe)
            kinds = [getattr(getattr(m, "config", None), "model_type", None) for m in (ref, cand)]
            if None not in kinds and kinds[0] != kinds[1] and getattr(cand, "sparsify_plan", None) is None:
                from ..errors import OptionError

                raise OptionError(f"DENSE is a {kinds[0]} model and MOE a {kinds[1]} model that no sparsify.json says "
                                  "was upcycled from it; verify compares an upcycled model with its dense source")
            o.step("running both models")
            c, runtime = compare(ref, cand, seed=seed), "torch"
            dtype = weights_dtype(ref, cand)
        rtol = rtol_for(dtype)
    bound = atol if atol is not None else rtol * c.max_ref
    problems = list(getattr(c, "problems", []))
    within = c.max_abs <= bound
    ok = within and not problems
    finite = math.isfinite(c.max_abs)
    why = None if ok else _why_different(plan, source, rtol)
    doc = {"command": "verify", "dense": dense, "moe": moe, "runtime": runtime, "seed": seed,
           "max_abs": c.max_abs if finite else None, "max_rel": c.max_rel if finite else None,
           "max_ref": c.max_ref, "tolerance": bound, "rtol": None if atol is not None else rtol, "match": ok,
           "same_source": None if source is None else source.same, "explanation": why,
           "note": c.note}
    if hasattr(c, "layers"):  # streamed: per layer, and the tensor and config checks
        doc.update(_streamed_doc(c))
    o.emit(doc)
    if finite:
        o.detail(f"max abs diff {c.max_abs:.3e}   max rel diff {c.max_rel:.3e}   (tolerance {bound:.3e})")
    else:
        o.detail(c.note or "the outputs differ without bound")
    if hasattr(c, "layers"):
        _streamed_details(o, c)
    if ok:
        o.result("match", style="bold green")
    elif not within:
        o.result(f"MISMATCH: outputs differ beyond the tolerance; {why}", style="bold red")
    else:
        o.result(f"MISMATCH: {problems[0]}; {why}", style="bold red")
    if not ok:
        raise typer.Exit(1)


def _streamed_doc(c) -> dict:
    return {
        "layers": [{"module": d.module, "max_abs": d.max_abs, "max_rel": d.max_rel, "max_ref": d.max_ref} for d in c.layers],
        "tensors": {"checked": c.tensors_checked, "unchecked": c.tensors_unchecked,
                    "differing": [{"name": t.name, "max_abs": t.max_abs, "max_ref": t.max_ref} for t in c.tensors_differing]},
        "config_differing": c.config_differing,
        "problems": c.problems,
        "format_note": c.note,
    }


def _streamed_details(o: Output, c) -> None:
    if c.layers:
        worst = max(c.layers, key=lambda d: d.max_rel)
        o.detail(f"{len(c.layers)} MoE layers compared with their dense FFNs one at a time; largest difference at "
                 f"{worst.module}: max abs {worst.max_abs:.3e}, max rel {worst.max_rel:.3e}")
    unchecked = f", {len(c.tensors_unchecked)} not determined by the dense model and the plan" if c.tensors_unchecked else ""
    o.detail(f"{c.tensors_checked} tensors compared with what the plan makes of the dense model{unchecked}; "
             f"{len(c.tensors_differing)} differ")
    for line in c.problems:
        o.detail(line, style="red")
    if c.note:
        o.detail(f"note: {c.note}", style="yellow")


def _source_model_type(out) -> str | None:
    """The source model type a native output's config records (None for the Hugging Face formats)."""
    if not out.native:
        return None
    from ..formats.native import read_config

    return read_config(out.path).model_type


def _why_different(plan, source, rtol: float) -> str:
    """What a difference beyond the tolerance means, from the output's plan and recorded source."""
    if source is not None and source.same is False:
        return source.line
    if plan is None:
        return "neither graph records a plan that says whether they should differ"
    why = plan.why_not_preserving()
    if why:
        return f"as its plan leads to: {why}"
    unknown = " (and whether DENSE is its source cannot be known)" if source is not None and source.same is None else ""
    return (f"its plan preserves the dense outputs, so the output's weights are not what the conversion wrote{unknown}; "
            f"write it again (default tolerance {rtol:g} x the largest dense output for these weights' dtype)")


def _onnx_plan(path: str):
    """The plan an upcycled graph records in its metadata (None when it records none)."""
    import json

    import onnx

    from ..formats.onnx import METADATA_KEY
    from ..plan import UpcyclePlan

    try:  # the graph has just run in ONNX Runtime; its metadata is read without its weights
        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return UpcyclePlan.from_dict(json.loads(props[METADATA_KEY])["plan"])
    except Exception:  # no or a damaged plan: the verdict then says nothing records one
        return None
