"""`sparsify shard MOE --plan plan.json -o shards/`: per-rank checkpoints for expert parallelism."""

from __future__ import annotations

from pathlib import Path

import typer

from ..io.atomic import check_output
from ..partition.memory import format_bytes
from ..partition.placement import ExpertPlacement
from ..partition.shards import REPLICATED, read_shard_manifest, write_shards
from .main import app, console
from .partition import native_dir


@app.command()
def shard(
    moe: str = typer.Argument(..., help="An upcycled model directory (written by sparsify upcycle)."),
    plan: Path = typer.Option(..., "--plan", help="The placement from sparsify partition (plan.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write one file of experts per rank plus the replicated tensors; each rank of an
    expert-parallel job then loads only its own experts (sparsify.load(OUT, group=...))."""
    placement = ExpertPlacement.load(plan)
    check_output(out, force, [moe, plan], kind="dir")
    write_shards(native_dir(moe), placement, out, force=force)
    info = read_shard_manifest(out)
    replicated = (Path(out) / REPLICATED).stat().st_size
    console.print(f"[bold green]sharded[/] {moe} -> {out} for {placement.world_size} ranks")
    console.print(f"  {REPLICATED}: {format_bytes(replicated)} (every rank)")
    for r, rank in enumerate(info["ranks"]):
        console.print(f"  {rank['file']}: {format_bytes(rank['bytes'])} of experts (rank {r})")
