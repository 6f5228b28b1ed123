"""`sparsify upcycle SOURCE --experts N -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..api import save, upcycle_with_plan
from ..io.atomic import check_output
from ..io.sources import load_source, resolve_source
from ..moe import MoEConfig
from .common import count_params, human, parse_layers
from .main import app, console, err_console


@app.command()
def upcycle(
    source: str = typer.Argument(..., help="Dense model: a local HF directory, a hub id, or demo:t5|t5-gated|bert|gpt2|llama."),
    experts: int = typer.Option(..., "--experts", "-e", help="Experts per MoE layer (2 or more)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Experts per token [default: 2; 1 for switch]."),
    router: str = typer.Option("topk", help="Router: topk | switch | expert-choice (encoder layers only)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Renormalise the top-k weights to sum to 1."),
    every: Optional[int] = typer.Option(None, "--every", help="Make FFN j of each stack MoE when j % N == N-1 [default: 2]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated FFN indices within each stack, e.g. 1,3,5."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Expert capacity factor; default dropless."),
    noise: float = typer.Option(0.0, "--noise", help="Std of Gaussian noise added to each expert copy (breaks exact preservation)."),
    seed: int = typer.Option(0, "--seed", help="Seed of router init and expert noise."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
) -> None:
    """Convert a dense model into an MoE model whose experts start as copies of its FFNs."""
    from ..errors import OptionError

    if every is not None and layers is not None:
        raise OptionError("give either --every or --layers, not both")
    layer_list = parse_layers(layers)
    if top_k is None:
        top_k = 1 if router == "switch" else 2
    # Check options and output before any slow work.
    MoEConfig(num_experts=experts, top_k=top_k, router=router, normalize=normalize, capacity_factor=capacity_factor)
    if every is not None and every < 1:
        raise OptionError(f"--every must be 1 or more, got {every}")
    if noise < 0:
        raise OptionError(f"--noise must be non-negative, got {noise}")
    check_output(out, force)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(f"loading {source}", total=4)
        src = resolve_source(source)
        dense, src = load_source(src, seed=0)
        dense_params = count_params(dense)
        progress.update(task, advance=1, description="capturing graph, finding FFNs, converting")
        model, plan, src = upcycle_with_plan(
            dense, experts=experts, top_k=top_k, every=every if every is not None else (None if layer_list else 2),
            layers=layer_list, router=router, normalize=normalize, capacity_factor=capacity_factor,
            noise=noise, seed=seed, source=src,
        )
        progress.update(task, advance=1, description=f"writing {out}")
        save(model, out, force=force)
        progress.update(task, advance=2)

    total, active = plan.param_counts(dense_params)
    cfg = plan.moe
    console.print(f"[bold green]upcycled[/] {source} -> {out}")
    console.print(f"  FFN sites found: {len(plan.sites)} ({len(plan.rejected)} candidates rejected)")
    console.print(f"  layers converted: {len(plan.selected)} -> {cfg.num_experts} experts, router {cfg.router}, top-{cfg.top_k}")
    console.print(f"  parameters: {human(total)} total, {human(active)} active per token (dense: {human(dense_params)})")
    why = cfg.why_not_preserving() or ("--noise perturbs the expert copies" if noise > 0 else None)
    if why:
        console.print(f"  [yellow]outputs differ from the dense model at initialisation[/]: {why}")
    else:
        console.print("  outputs equal the dense model's at initialisation (check: sparsify verify)")
