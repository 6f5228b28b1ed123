"""`sparsify shard MOE --plan plan.json -o shards/`: per-rank checkpoints for expert parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..units import format_bytes
from .main import command
from .options import Force, UpcycledDir
from .output import Output

__all__ = ["shard"]


@command()
def shard(
    o: Output,
    moe: UpcycledDir,
    plan: Annotated[Path, typer.Option("--plan", metavar="FILE", help="The placement from sparsify partition (plan.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output directory (written atomically).")],
    force: Force = False,
) -> None:
    """Write per-rank checkpoints for expert parallelism.

    One file of experts per rank plus the replicated tensors; each rank of an expert-parallel
    job then loads only its own experts (sparsify.load(OUT, group=...))."""
    from ..io.atomic import check_output
    from ..partition.placement import ExpertPlacement
    from ..partition.shards import REPLICATED, read_shard_manifest, write_shards
    from .partition import native_dir

    placement = ExpertPlacement.load(plan)
    check_output(out, force, [moe, plan], kind="dir")
    o.step(f"writing {out}")
    write_shards(native_dir(moe), placement, out, force=force)
    info = read_shard_manifest(out)
    replicated = (Path(out) / REPLICATED).stat().st_size
    o.emit({"command": "shard", "model": moe, "out": str(out), "world_size": placement.world_size,
            "replicated": {"file": REPLICATED, "bytes": replicated},
            "ranks": [{"rank": r, "file": rank["file"], "bytes": rank["bytes"]} for r, rank in enumerate(info["ranks"])]})
    o.result(f"sharded {moe} -> {out} for {placement.world_size} ranks")
    o.detail(f"  {REPLICATED}: {format_bytes(replicated)} (every rank)")
    for r, rank in enumerate(info["ranks"]):
        o.detail(f"  {rank['file']}: {format_bytes(rank['bytes'])} of experts (rank {r})")
