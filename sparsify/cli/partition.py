"""`sparsify partition MOE --world-size N [--stats S] [--memory-per-rank 80GB] -o plan.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import SourceError
from ..formats.native import read_manifest
from ..io.atomic import check_output
from ..io.sources import is_native, resolve_source
from ..partition.memory import footprint_of_checkpoint, format_bytes, parse_memory
from ..partition.placement import ExpertPlacement, uniform_moe
from ..partition.planner import plan_placement
from ..partition.stats import RoutingStats
from ..plan import UpcyclePlan
from .main import app, console


def native_dir(spec: str) -> Path:
    """The directory of an upcycled model, or a one-line error."""
    src = resolve_source(spec)
    if not is_native(src.path):
        raise SourceError(f"'{spec}' is not an upcycled model directory; make one with sparsify upcycle")
    return src.path


@app.command()
def partition(
    moe: str = typer.Argument(..., help="An upcycled model directory (written by sparsify upcycle)."),
    world_size: int = typer.Option(..., "--world-size", "-n", help="Ranks (devices) that share the experts."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the placement (plan.json, atomically)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Routing statistics from sparsify profile [default: uniform load]."),
    memory_per_rank: Optional[str] = typer.Option(None, "--memory-per-rank", help="Memory of one rank for weights, e.g. 80GB."),
    uneven: bool = typer.Option(False, "--uneven", help="Let ranks hold different numbers of experts."),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Load above the best balanced maximum allowed to keep co-chosen experts together (0.05 = 5%) [default: 0.01]."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Place each MoE layer's experts on N ranks: balance load, fit memory, keep co-chosen experts together."""
    memory = parse_memory(memory_per_rank) if memory_per_rank is not None else None
    check_output(out, force)
    path = native_dir(moe)
    plan = UpcyclePlan.from_dict(read_manifest(path)["plan"])
    routing = RoutingStats.load(stats) if stats is not None else None
    if routing is not None:
        routing.check_matches(plan, where=f"'{stats}'")
    footprint = footprint_of_checkpoint(path, plan.selected, uniform_moe(plan).num_experts)
    placement = plan_placement(plan, world_size, footprint, routing, memory, equal_experts=not uneven, tolerance=tolerance)
    placement.save(out, force=force)
    print_report(placement)
    console.print(f"[bold green]wrote[/] {out}")


def print_report(placement: ExpertPlacement) -> None:
    """The planner's report: per layer, then totals, planned against contiguous."""
    rep = placement.report
    table = Table(title=f"placement on {placement.world_size} ranks (stats: {rep['stats']})", title_justify="left")
    for col in ("MoE layer", "experts per rank", "load per rank", "max/mean", "contiguous max/mean",
                "ranks per token", "a2a bytes/token", "contiguous bytes/token"):
        table.add_column(col)
    for path, m in rep["layers"].items():
        c = m["contiguous"]
        table.add_row(path, " ".join(map(str, m["experts_per_rank"])), " ".join(f"{x:.0%}" for x in m["load_per_rank"]),
                      f"{m['imbalance']:.3f}", f"{c['imbalance']:.3f}", f"{m['ranks_per_token']:.2f}",
                      f"{m['a2a_bytes_per_token']:.0f}", f"{c['a2a_bytes_per_token']:.0f}")
    console.print(table)
    console.print(f"  load imbalance (max/mean, mean over layers): planned {rep['imbalance']:.3f}, contiguous {rep['contiguous_imbalance']:.3f}")
    console.print(f"  expected all-to-all bytes per token (all layers): planned {rep['a2a_bytes_per_token']:.0f}, "
                  f"contiguous {rep['contiguous_a2a_bytes_per_token']:.0f}")
    mem = rep["memory_per_rank"]
    limit = f" of {format_bytes(rep['memory_limit'])}" if rep.get("memory_limit") else ""
    console.print(f"  memory per rank (weights): {format_bytes(min(mem))} .. {format_bytes(max(mem))}{limit} "
                  f"({format_bytes(rep['replicated_bytes'])} replicated)")
