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

    Exits 0 within the tolerance, 1 outside it. Two .onnx files are run in ONNX Runtime (CPU);
    anything else is loaded as a model. Given only an output directory (sparsify verify OUT):
    checks every file against the size and sha256 its manifest records."""
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
        from ..provenance import check_source
        from ..verify import compare, rtol_for, weights_dtype
        from .common import cache_note, load_any

        for note in filter(None, map(cache_note, (dense, moe))):
            o.detail(note)
        o.step(f"loading {dense}")
        ref, dense_src = load_any(dense)
        o.step(f"loading {moe}")
        cand, _ = load_any(moe)
        plan = getattr(cand, "sparsify_plan", None)
        if plan is not None:
            source = check_source(getattr(cand, "sparsify_source", None), dense_src)
            o.detail(source.line)
        o.step("running both models")
        c, runtime = compare(ref, cand, seed=seed), "torch"
        rtol = rtol_for(weights_dtype(ref, cand))
    bound = atol if atol is not None else rtol * c.max_ref
    ok = c.max_abs <= bound
    finite = math.isfinite(c.max_abs)
    why = _why_different(plan, source, rtol) if not ok else None
    o.emit({"command": "verify", "dense": dense, "moe": moe, "runtime": runtime, "seed": seed,
            "max_abs": c.max_abs if finite else None, "max_rel": c.max_rel if finite else None,
            "max_ref": c.max_ref, "tolerance": bound, "rtol": None if atol is not None else rtol, "match": ok,
            "same_source": None if source is None else source.same, "explanation": why,
            "note": c.note})
    if finite:
        o.detail(f"max abs diff {c.max_abs:.3e}   max rel diff {c.max_rel:.3e}   (tolerance {bound:.3e})")
    else:
        o.detail(c.note or "the outputs differ without bound")
    if ok:
        o.result("match", style="bold green")
    else:
        o.result(f"MISMATCH: outputs differ beyond the tolerance; {why}", style="bold red")
        raise typer.Exit(1)


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
