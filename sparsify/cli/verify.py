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
    onnx = [spec.endswith(".onnx") for spec in (dense, moe)]
    if all(onnx):
        from ..onnx.compare import compare_onnx

        o.step("running both graphs in ONNX Runtime")
        c, runtime = compare_onnx(dense, moe, seed=seed), "onnxruntime"
    elif any(onnx):
        from ..errors import OptionError

        raise OptionError("verify compares two models or two ONNX graphs; export the model to ONNX first "
                          "(sparsify export) or pass the checkpoint of the graph")
    else:
        from ..verify import compare
        from .common import cache_note, load_any

        for note in filter(None, map(cache_note, (dense, moe))):
            o.detail(note)
        o.step(f"loading {dense}")
        ref, _ = load_any(dense)
        o.step(f"loading {moe}")
        cand, _ = load_any(moe)
        o.step("running both models")
        c, runtime = compare(ref, cand, seed=seed), "torch"
    bound = atol if atol is not None else 1e-5 * c.max_ref
    ok = c.within(atol)
    finite = math.isfinite(c.max_abs)
    o.emit({"command": "verify", "dense": dense, "moe": moe, "runtime": runtime, "seed": seed,
            "max_abs": c.max_abs if finite else None, "max_rel": c.max_rel if finite else None,
            "max_ref": c.max_ref, "tolerance": bound, "match": ok,
            "note": None if finite else "the outputs have different shapes"})
    if finite:
        o.detail(f"max abs diff {c.max_abs:.3e}   max rel diff {c.max_rel:.3e}   (tolerance {bound:.3e})")
    else:
        o.detail("the outputs have different shapes")
    if ok:
        o.result("match", style="bold green")
    else:
        o.result("MISMATCH: outputs differ beyond the tolerance", style="bold red")
    if not ok:
        raise typer.Exit(1)
