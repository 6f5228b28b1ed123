"""`sparsify verify DENSE MOE`: compare outputs on the same seeded inputs; `sparsify verify OUT`: check its files."""

from __future__ import annotations

from typing import Optional

import typer

from ..verify import compare
from .common import load_any
from .main import app, console


@app.command()
def verify(
    dense: str = typer.Argument(..., help="The dense model (directory, hub id, or demo:NAME); alone: an output directory to check."),
    moe: Optional[str] = typer.Argument(None, help="The upcycled model directory."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance [default: 1e-5 x largest dense output]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the test inputs."),
) -> None:
    """Run both models on the same inputs; exit 0 within tolerance, 1 outside it. Given only an
    output directory: check every file against the size and sha256 its manifest records."""
    if moe is None:
        from ..formats.manifest import verify_output

        manifest, n = verify_output(dense)
        console.print(f"[bold green]OK[/]: {n} files of {dense} match the sizes and sha256 recorded in {manifest}")
        return
    ref, _ = load_any(dense)
    cand, _ = load_any(moe)
    c = compare(ref, cand, seed=seed)
    bound = atol if atol is not None else 1e-5 * c.max_ref
    ok = c.within(atol)
    console.print(f"max abs diff {c.max_abs:.3e}   max rel diff {c.max_rel:.3e}   (tolerance {bound:.3e})")
    console.print("[bold green]match[/]" if ok else "[bold red]MISMATCH[/]: outputs differ beyond the tolerance")
    if not ok:
        raise typer.Exit(1)
