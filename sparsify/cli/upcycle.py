"""`sparsify upcycle SOURCE --experts N -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..convert import convert
from .common import human, parse_layers
from .main import app, console, err_console

_STAGES = {"load": "loading source", "plan": "capturing graph, finding FFNs, planning", "write": "writing"}


@app.command()
def upcycle(
    source: str = typer.Argument(..., help="Dense model: a local HF directory, a hub id, or demo:t5|t5-gated|bert|gpt2|llama."),
    experts: int = typer.Option(..., "--experts", "-e", help="Experts per MoE layer (2 or more)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Experts per token [default: 2; 1 for switch]."),
    router: Optional[str] = typer.Option(None, help="Router: topk | switch | expert-choice (encoder layers only) [default: topk]."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Renormalise the top-k weights to sum to 1."),
    every: Optional[int] = typer.Option(None, "--every", help="Make FFN j of each stack MoE when j % N == N-1 [default: 2; mixtral: 1]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated FFN indices within each stack, e.g. 1,3,5."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Expert capacity factor; default dropless."),
    noise: float = typer.Option(0.0, "--noise", help="Std of Gaussian noise added to each expert copy (breaks exact preservation)."),
    seed: int = typer.Option(0, "--seed", help="Seed of router init and expert noise."),
    format: str = typer.Option("auto", "--format", "-f", help="auto | native | mixtral | qwen2-moe | switch."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 [default: the source's]."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB or 500MiB."),
    target: str = typer.Option("ort", "--target", help="ONNX sources only: ort (fuse into com.microsoft.MoE) | standard."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
) -> None:
    """Convert a dense model into an MoE model whose experts start as copies of its FFNs.

    Checkpoints are converted by streaming, one tensor at a time, in bounded memory."""
    if source.endswith(".onnx"):  # ONNX-native upcycling: ONNX in, ONNX out (sparsify.onnx)
        from .export import upcycle_onnx_command

        return upcycle_onnx_command(source, out, experts, top_k, router, normalize, every, layers,
                                    capacity_factor, noise, seed, force, target=target)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    # Off the terminal the bar shows nothing, but stopping it would print a blank line.
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_interactive) as bar:
        task = bar.add_task(f"loading {source}", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=_STAGES.get(stage, stage), completed=done, total=total if stage == "write" else None)

        r = convert(
            source, out, experts=experts, top_k=top_k, router=router, normalize=normalize, every=every,
            layers=parse_layers(layers), capacity_factor=capacity_factor, noise=noise, seed=seed,
            format=format, dtype=dtype, shard_size=shard_size, force=force, progress=progress,
        )
    plan, cfg = r.plan, r.plan.moe
    total, active = r.params
    console.print(f"[bold green]upcycled[/] {source} -> {r.out}")
    console.print(f"  FFN sites found: {len(plan.sites)} ({len(plan.rejected)} candidates rejected)")
    console.print(f"  layers converted: {len(plan.selected)} -> {cfg.num_experts} experts, router {cfg.router}, top-{cfg.top_k}")
    console.print(f"  parameters: {human(total)} total, {human(active)} active per token (dense: {human(r.dense_params)})")
    console.print(f"  format: {r.format_reason}; {human(r.bytes_written)}B written{' by streaming' if r.streamed else ''}")
    if r.why_not_preserving:
        console.print(f"  [yellow]outputs differ from the dense model at initialisation[/]: {r.why_not_preserving}")
    else:
        console.print("  outputs equal the dense model's at initialisation (check: sparsify verify)")
