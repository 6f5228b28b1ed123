"""`sparsify inspect PATH`: the FFN sites and parameter counts of a dense or upcycled model."""

from __future__ import annotations

import typer

from ..formats.native import read_manifest
from ..io.sources import is_native, resolve_source
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
    if is_native(src.path):
        plan = UpcyclePlan.from_dict(read_manifest(src.path)["plan"])
        console.print(sites_table(plan, f"{path}: upcycled ({len(plan.selected)} of {len(plan.sites)} FFNs are MoE)"))
        cfg = plan.moe
        per_site = sum(s.expert_param_count() for s in plan.selected_sites)
        active = params - (cfg.num_experts - cfg.top_k) * per_site
        console.print(f"parameters: {human(params)} total, {human(active)} active per token")
    else:
        plan = PassManager([FindFFN()]).run(model).plan
        console.print(sites_table(plan, f"{path}: dense, {len(plan.sites)} FFN sites"))
        console.print(f"parameters: {human(params)}")
    for r in plan.rejected:
        console.print(f"[yellow]rejected[/] {r}")
