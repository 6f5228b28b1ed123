"""`sparsify export SOURCE -o model.onnx`: ONNX graphs, MoE layers fused for ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .main import command
from .options import ONNX_TARGETS, Force, argument, choices
from .output import Output

__all__ = ["export"]


@command()
def export(
    o: Output,
    source: Annotated[str, argument(
        "SOURCE", "An upcycled directory (native or Hugging Face format), or any dense source upcycle accepts.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="FILE",
        help="Output .onnx file; encoder-decoder models write STEM-encoder.onnx and STEM-decoder.onnx.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX: the only format, so it may be left out.")] = False,
    target: Annotated[str, typer.Option(
        "--target", metavar=choices(ONNX_TARGETS),
        help="ort: MoE layers as com.microsoft.MoE where ONNX Runtime supports them; standard: portable standard ops.")] = "ort",
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset, 18 to 23.")] = 18,
    dynamic: Annotated[bool, typer.Option("--dynamic/--static",
                                          help="Dynamic batch and sequence axes, or the fixed --batch x --seq shape.")] = True,
    batch: Annotated[int, typer.Option("--batch", metavar="B", help="Batch size of a --static export.")] = 1,
    seq: Annotated[int, typer.Option("--seq", metavar="S", help="Sequence length of a --static export.")] = 128,
    force: Force = False,
) -> None:
    """Export a model to ONNX, MoE layers fused for ONNX Runtime.

    Every MoE layer that ONNX Runtime's com.microsoft.MoE supports becomes one node (--target
    ort); the rest, or everything with --target standard, is written in standard ops."""
    from ..onnx.export import check_export_options, export_onnx
    from .common import cache_note, load_any

    check_export_options(target, opset, batch, seq)  # before the (slow) load
    o.step(f"loading {source}")
    note = cache_note(source)
    if note:
        o.detail(note)
    model, src = load_any(source)
    o.step("exporting to ONNX: torch.export, translation, MoE fusion, onnx.checker")
    shape = {"batch": batch, "seq": seq} if not dynamic else {}  # dynamic: small example inputs
    result = export_onnx(model, out, target=target, opset=opset, dynamic=dynamic, force=force, sources=[src.path],
                         **shape)
    doc = {
        "command": "export", "source": source, "files": [str(f) for f in result.files], "opset": result.opset,
        "target": result.target, "dynamic": dynamic, "batch": None if dynamic else batch, "seq": None if dynamic else seq,
        "graphs": [{"role": g.role, "file": str(g.path), "inputs": list(g.inputs), "outputs": list(g.outputs),
                    **({"fixed_inputs": g.fixed} if g.fixed else {}), **g.report.to_dict(), "lines": g.report.lines()} for g in result.graphs],
    }
    o.emit(doc)
    o.result(f"exported {source} -> {', '.join(doc['files'])}")
    shape_text = "dynamic batch and sequence" if dynamic else f"static {batch} x {seq}"
    o.detail(f"  opset {doc['opset']}, target {doc['target']}, {shape_text}")
    for g in doc["graphs"]:
        o.detail(f"  {Path(g['file']).name}: ({', '.join(g['inputs'])}) -> {', '.join(g['outputs'])}")
        for name, values in g.get("fixed_inputs", {}).items():
            o.detail(f"    fixed in the graph, not an input: {name} = {values}")
        for line in g["lines"]:
            o.detail(f"    {line}")
