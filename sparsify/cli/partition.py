"""`sparsify partition MOE --world-size N [--stats S] [--memory-per-rank 80GB] -o plan.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..units import format_bytes
from .main import command
from .options import Force, UpcycledDir
from .output import Output

__all__ = ["partition", "native_dir"]


def native_dir(spec: str) -> Path:
    """The directory of an upcycled model, or a one-line error."""
    from ..errors import SourceError
    from ..io.sources import is_native, resolve_source

    src = resolve_source(spec)
    if not is_native(src.path):
        raise SourceError(f"'{spec}' is not an upcycled model directory; make one with sparsify upcycle")
    return src.path


@command()
def partition(
    o: Output,
    moe: UpcycledDir,
    world_size: Annotated[int, typer.Option("--world-size", "-n", metavar="N", help="Ranks (devices) that share the experts.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Where to write the placement (plan.json, atomically).")],
    stats: Annotated[Optional[Path], typer.Option("--stats", metavar="FILE", show_default="uniform load",
                                                  help="Routing statistics from sparsify profile.")] = None,
    memory_per_rank: Annotated[Optional[str], typer.Option("--memory-per-rank", metavar="SIZE", show_default="no limit",
                                                           help="Memory of one rank for weights, e.g. 80GB.")] = None,
    uneven: Annotated[bool, typer.Option("--uneven", help="Let ranks hold different numbers of experts.")] = False,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", metavar="T",
        help="Load above the best balanced maximum allowed to keep co-chosen experts together (0.05 = 5%).")] = 0.01,
    force: Force = False,
) -> None:
    """Place each MoE layer's experts on N ranks.

    Balances the expected load, fits --memory-per-rank, and keeps experts that are often chosen
    together on one rank; reports load, memory and all-to-all traffic against the contiguous
    placement."""
    from ..formats.native import read_manifest
    from ..io.atomic import check_output
    from ..partition.memory import footprint_of_checkpoint, parse_memory
    from ..partition.placement import uniform_moe
    from ..partition.planner import plan_placement
    from ..partition.stats import RoutingStats
    from ..plan import UpcyclePlan

    memory = parse_memory(memory_per_rank) if memory_per_rank is not None else None
    check_output(out, force, [moe, stats], kind="file")
    path = native_dir(moe)
    plan = UpcyclePlan.from_dict(read_manifest(path)["plan"])
    routing = RoutingStats.load(stats) if stats is not None else None
    if routing is not None:
        routing.check_matches(plan, where=f"'{stats}'")
    o.step("planning the placement")
    footprint = footprint_of_checkpoint(path, plan.selected, uniform_moe(plan).num_experts)
    placement = plan_placement(plan, world_size, footprint, routing, memory, equal_experts=not uneven, tolerance=tolerance)
    placement.save(out, force=force, sources=[path, stats])
    o.emit({"command": "partition", "model": moe, "out": str(out), "world_size": placement.world_size,
            "report": placement.report})
    _print_report(o, placement.world_size, placement.report)
    o.result(f"wrote {out}")


def _print_report(o: Output, world_size: int, rep: dict[str, Any]) -> None:
    """The planner's report: per layer, then totals, planned against contiguous."""
    table = Table(title=f"placement on {world_size} ranks (stats: {rep['stats']})", title_justify="left")
    for col in ("MoE layer", "experts per rank", "load per rank", "max/mean", "contiguous max/mean",
                "ranks per token", "a2a bytes/token", "contiguous bytes/token"):
        table.add_column(col)
    for path, m in rep["layers"].items():
        c = m["contiguous"]
        table.add_row(path, " ".join(map(str, m["experts_per_rank"])), " ".join(f"{x:.0%}" for x in m["load_per_rank"]),
                      f"{m['imbalance']:.3f}", f"{c['imbalance']:.3f}", f"{m['ranks_per_token']:.2f}",
                      f"{m['a2a_bytes_per_token']:.0f}", f"{c['a2a_bytes_per_token']:.0f}")
    o.table(table)
    o.detail(f"  load imbalance (max/mean, mean over layers): planned {rep['imbalance']:.3f}, "
             f"contiguous {rep['contiguous_imbalance']:.3f}")
    o.detail(f"  expected all-to-all bytes per token (all layers): planned {rep['a2a_bytes_per_token']:.0f}, "
             f"contiguous {rep['contiguous_a2a_bytes_per_token']:.0f}")
    mem = rep["memory_per_rank"]
    limit = f" of {format_bytes(rep['memory_limit'])}" if rep.get("memory_limit") else ""
    o.detail(f"  memory per rank (weights): {format_bytes(min(mem))} .. {format_bytes(max(mem))}{limit} "
             f"({format_bytes(rep['replicated_bytes'])} replicated)")
