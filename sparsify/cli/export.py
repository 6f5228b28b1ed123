"""`sparsify export SOURCE --onnx -o model.onnx`, and the printout of ONNX-native upcycling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import OptionError
from .common import human, load_any, routing_summary
from .main import app, console, err_console

__all__ = ["export", "upcycle_onnx_command"]


@app.command()
def export(
    source: str = typer.Argument(..., help="An upcycled directory (native or HF format), or any dense source upcycle accepts."),
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the export format there is)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx file; encoder-decoder models write STEM-encoder.onnx and STEM-decoder.onnx."),
    target: str = typer.Option("ort", "--target", help="ort: MoE layers as com.microsoft.MoE where ONNX Runtime supports them; standard: portable standard ops."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 to 23)."),
    dynamic: bool = typer.Option(True, "--dynamic/--static", help="Dynamic batch and sequence axes, or the fixed --batch x --seq shape."),
    batch: int = typer.Option(1, "--batch", help="Batch size of a --static export."),
    seq: int = typer.Option(128, "--seq", help="Sequence length of a --static export."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs (only once the new ones are complete)."),
) -> None:
    """Export a model to ONNX, its MoE layers fused for ONNX Runtime or as standard ops."""
    from ..onnx.export import check_export_options, export_onnx

    if not onnx:
        raise OptionError("choose an export format: --onnx")
    check_export_options(target, opset, batch, seq)  # before the (slow) load
    with err_console.status(f"loading {source}"):
        model, _ = load_any(source)
    with err_console.status("capturing and exporting to ONNX"):
        shape = {"batch": batch, "seq": seq} if not dynamic else {}  # dynamic: small example inputs
        result = export_onnx(model, out, target=target, opset=opset, dynamic=dynamic, force=force, **shape)
    shape = "dynamic batch and sequence" if dynamic else f"static {batch} x {seq}"
    console.print(f"[bold green]exported[/] {source} -> {', '.join(str(f) for f in result.files)}")
    console.print(f"  opset {result.opset}, target {result.target}, {shape}")
    for g in result.graphs:
        console.print(f"  {g.path.name}: ({', '.join(g.inputs)}) -> {', '.join(g.outputs)}")
        for line in g.report.lines():
            console.print(f"    {line}", highlight=False)


def upcycle_onnx_command(source: str, out: Path, recipe: Any, force: bool, target: str = "ort") -> None:
    """`sparsify upcycle model.onnx ...`: upcycle the ONNX graph as `recipe` says and print a summary."""
    from ..onnx.upcycle import upcycle_onnx

    result = upcycle_onnx(source, out, recipe=recipe, target=target, force=force)
    plan = result.plan
    console.print(f"[bold green]upcycled[/] {source} -> {result.path}")
    console.print(f"  FFN sites found: {len(plan.sites)} ({len(plan.rejected)} candidates rejected)")
    console.print(f"  MoE layers: {len(plan.selected)} of {len(plan.sites)} FFNs, {routing_summary(plan)}")
    console.print(f"  parameters: {human(result.total_params)} total (dense: {human(result.dense_params)})")
    for line in result.report.lines():
        console.print(f"  {line}", highlight=False)
    why = plan.why_not_preserving()
    if why:
        console.print(f"  [yellow]outputs differ from the dense graph at initialisation[/]: {why}")
    else:
        console.print("  outputs equal the dense graph's at initialisation")
