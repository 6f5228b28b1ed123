"""`sparsify inspect PATH`: the FFN sites and parameter counts of a dense or upcycled model."""

from __future__ import annotations

import json

import typer

from ..formats.registry import output_format
from ..io.sources import resolve_source
from ..passes import FindFFN, PassManager
from ..plan import UpcyclePlan
from .common import count_params, human, load_any, sites_table
from .main import app, console


@app.command()
def inspect(path: str = typer.Argument(..., help="A dense source (directory, hub id, demo:NAME) or an upcycled directory.")) -> None:
    """Show each FFN site (path, form, activation, experts if MoE) and parameter counts."""
    src = resolve_source(path)
    model, src = load_any(path)
    params = count_params(model)
    fmt = output_format(src.path) if src.path is not None else None
    if fmt is not None:
        plan = UpcyclePlan.from_dict(json.loads((src.path / "sparsify.json").read_text())["plan"])
        console.print(sites_table(plan, f"{path}: upcycled, {fmt} format ({len(plan.selected)} of {len(plan.sites)} FFNs are MoE)"))
        inactive = sum(t - a for t, a in (plan.layer(s).param_counts(s) for s in plan.selected_sites))
        active = params - inactive
        console.print(f"parameters: {human(params)} total, {human(active)} active per token")
    else:
        plan = PassManager([FindFFN()]).run(model).plan
        console.print(sites_table(plan, f"{path}: dense, {len(plan.sites)} FFN sites"))
        console.print(f"parameters: {human(params)}")
    for r in plan.rejected:
        console.print(f"[yellow]rejected[/] {r}")
