"""`sparsify upcycle SOURCE --experts N -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..convert import convert
from .common import human, parse_layers, routing_summary
from .main import app, console, err_console

_STAGES = {"load": "loading source", "plan": "capturing graph, finding FFNs, planning", "write": "writing"}


@app.command()
def upcycle(
    source: str = typer.Argument(..., help="Dense model: a local HF directory, a hub id, or demo:t5|t5-gated|bert|gpt2|llama."),
    experts: Optional[int] = typer.Option(None, "--experts", "-e", help="Experts per MoE layer (2 or more) [default: one per --experts-from source]."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Experts per token [default: 2; 1 for switch]."),
    router: Optional[str] = typer.Option(None, help="Router: topk | switch | expert-choice (encoder layers only) [default: topk]."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Renormalise the top-k weights to sum to 1."),
    every: Optional[int] = typer.Option(None, "--every", help="Make FFN j of each stack MoE when j % N == N-1 [default: 2; mixtral: 1]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated FFN indices within each stack, e.g. 1,3,5."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Expert capacity factor; default dropless."),
    noise: float = typer.Option(0.0, "--noise", help="Std of Gaussian noise added to each expert copy (breaks exact preservation)."),
    seed: int = typer.Option(0, "--seed", help="Seed of router init and expert noise."),
    drop_ratio: float = typer.Option(0.0, "--drop-ratio", help="Drop-Upcycling: re-initialise this share of each expert's neurons from the weights' mean and std [default: 0]."),
    granularity: int = typer.Option(1, "--granularity", help="Granular upcycling: split each FFN into G shards, one per expert of a router group; --experts and --top-k multiples of G [default: 1]."),
    shared_fraction: float = typer.Option(0.0, "--shared-fraction", help="Put this share of each FFN's neurons in one always-on shared expert; the routed experts copy the rest [default: 0]."),
    split: bool = typer.Option(False, "--split", help="Parameter-neutral: each expert holds 1/E of the FFN's neurons (fewer active parameters; not function-preserving)."),
    experts_from: Optional[str] = typer.Option(None, "--experts-from", help="Comma-separated checkpoints (fine-tunes of SOURCE), one per expert in this order: each expert's FFNs are read from its own."),
    merge_base: str = typer.Option("base", "--merge-base", help="With --experts-from, where the other weights come from: base (SOURCE) | average (over SOURCE and the sources, Branch-Train-MiX)."),
    router_init: str = typer.Option("random", "--router-init", help="random | prompts (hidden states of --prompts) | embeddings (token embeddings of --prompts) | kmeans (of --calibration text)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="YAML or JSON: for each expert a list of positive prompts and optionally negative ones."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Text file whose hidden states --router-init kmeans clusters."),
    format: str = typer.Option("auto", "--format", "-f", help="auto | native | mixtral | qwen2-moe | switch."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 [default: the source's]."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB or 500MiB."),
    target: str = typer.Option("ort", "--target", help="ONNX sources only: ort (fuse into com.microsoft.MoE) | standard."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete)."),
) -> None:
    """Convert a dense model into an MoE model whose experts start as copies of its FFNs.

    Checkpoints are converted by streaming, one tensor at a time, in bounded memory."""
    if source.endswith(".onnx"):  # ONNX-native upcycling: ONNX in, ONNX out (sparsify.onnx)
        from ..errors import OptionError
        from .export import upcycle_onnx_command

        if experts_from or router_init != "random" or merge_base != "base":
            raise OptionError("--experts-from, --merge-base and --router-init take Hugging Face checkpoints, not ONNX models")
        if experts is None:
            raise OptionError("--experts is required for ONNX sources")

        return upcycle_onnx_command(source, out, experts, top_k, router, normalize, every, layers,
                                    capacity_factor, noise, seed, force, target=target, drop_ratio=drop_ratio,
                                    granularity=granularity, shared_fraction=shared_fraction, split=split)
    if experts is None and not experts_from:
        from ..errors import OptionError

        raise OptionError("--experts is required (or --experts-from, one expert per source)")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(f"loading {source}", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=_STAGES.get(stage, stage), completed=done, total=total if stage == "write" else None)

        r = convert(
            source, out, experts=experts, top_k=top_k, router=router, normalize=normalize, every=every,
            layers=parse_layers(layers), capacity_factor=capacity_factor, noise=noise, seed=seed,
            format=format, dtype=dtype, shard_size=shard_size, force=force, progress=progress,
            drop_ratio=drop_ratio, granularity=granularity, shared_fraction=shared_fraction, split=split,
            experts_from=[p for p in experts_from.split(",") if p] if experts_from is not None else None,
            merge_base=merge_base, router_init=router_init, prompts=prompts, calibration=calibration,
        )
    plan = r.plan
    total, active = r.params
    console.print(f"[bold green]upcycled[/] {source} -> {r.out}")
    console.print(f"  FFN sites found: {len(plan.sites)} ({len(plan.rejected)} candidates rejected)")
    console.print(f"  MoE layers: {len(plan.selected)} of {len(plan.sites)} FFNs, {routing_summary(plan)}")
    console.print(f"  parameters: {human(total)} total, {human(active)} active per token (dense: {human(r.dense_params)})")
    console.print(f"  format: {r.format_reason}; {human(r.bytes_written)}B written{' by streaming' if r.streamed else ''}")
    if r.why_not_preserving:
        console.print(f"  [yellow]outputs differ from the dense model at initialisation[/]: {r.why_not_preserving}")
    else:
        console.print("  outputs equal the dense model's at initialisation (check: sparsify verify)")
