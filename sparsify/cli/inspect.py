"""`sparsify inspect PATH`: the FFN sites, MoE layers and parameter counts of a model or ONNX graph."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..units import format_bytes, format_count
from .common import cache_note, counts_text, param_counts, params_from_total, site_rows, sites_table
from .main import command
from .options import argument
from .output import Output

__all__ = ["inspect"]


@command()
def inspect(
    o: Output,
    path: Annotated[str, argument(
        "PATH", "A dense source (directory, hub id, demo:NAME), an upcycled directory, or an .onnx graph.")],
) -> None:
    """Show a model's FFN sites, MoE layers and parameter counts.

    One row per FFN site: its module, activation and shape, and for an MoE layer its experts
    and router. ONNX graphs are read from their sparsify metadata, or searched for FFNs."""
    o.step(f"reading {path}")
    note = cache_note(path)
    if note:
        o.detail(note)
    doc = _inspect_onnx(path) if path.endswith(".onnx") else _inspect_model(path)
    o.emit(doc)
    sites, selected = doc["sites"], doc["selected"]
    if doc["kind"] == "upcycled":
        what = f"upcycled, {doc['format']} format, {len(selected)} of {len(sites)} FFNs are MoE layers"
    else:
        what = f"dense, {len(sites)} FFN sites"
    o.result(f"{path}: {what}")
    o.table(sites_table(sites, ""))
    if "graph" in doc:
        g = doc["graph"]
        o.detail(f"graph: {g['role']}, opset {g['opset']}{', target ' + g['target'] if g['target'] else ''}; "
                 f"({', '.join(g['inputs'])}) -> {', '.join(g['outputs'])}; {format_bytes(g['weight_bytes'])} of weights")
        for line in g["fusion_lines"]:
            o.detail(f"  {line}")
    p = doc["parameters"]
    o.detail(f"parameters: {counts_text(p)}" if doc["kind"] == "upcycled" else f"parameters: {format_count(p['total'])}")
    for r in doc["rejected"]:
        o.detail(f"rejected {r['path'] or '<root>'}: {r['reason']}", style="yellow")


def _doc(path: str, kind: str, fmt: str | None, plan: Any, params: dict[str, int]) -> dict[str, Any]:
    return {"command": "inspect", "path": path, "kind": kind, "format": fmt, "sites": site_rows(plan),
            "selected": list(plan.selected), "rejected": [{"path": r.path, "reason": r.reason} for r in plan.rejected],
            "parameters": params}


def _inspect_model(path: str) -> dict[str, Any]:
    """Configs, plans and tensor headers only: no weight is read, at any size (and for an
    output, neither torch nor transformers is imported unless its plan must be checked by its model)."""
    from ..formats.manifest import output_format
    from ..io.sources import resolve_source

    src = resolve_source(path)
    fmt = output_format(src.path) if src.path is not None else None
    if fmt is not None:
        from ..formats.stored import StoredOutput

        out = StoredOutput.open(src.path)
        out.check_fits()
        name = "native" if out.native else out.format
        return _doc(path, "upcycled", name, out.plan, params_from_total(out.plan, out.parameters))
    from ..io.sources import is_native, skeleton_of
    from ..passes import FindFFN, PassManager
    from .common import count_params

    if is_native(src.path):  # a damaged sparsify.json: reading it says what is wrong
        from ..formats.native import read_manifest

        read_manifest(src.path)
    model, _ = skeleton_of(src)  # meta parameters; the checkpoint's headers checked against them
    total = count_params(model)
    plan = PassManager([FindFFN()]).run(model).plan
    return _doc(path, "dense", None, plan, {"total": total, "active_per_token": total, "dense": total})


def _inspect_onnx(path: str) -> dict[str, Any]:
    from ..onnx.inspect import describe_onnx
    from ..passes.onnx.fuse_moe_ort import FusionReport

    s = describe_onnx(path)
    if s.upcycled:
        doc = _doc(path, "upcycled", "onnx", s.plan, params_from_total(s.plan, s.params))
    else:
        doc = _doc(path, "dense", "onnx", s.plan, param_counts(s.plan, s.params))
    report = FusionReport(list(s.fusion.get("fused", [])), dict(s.fusion.get("left", {})))
    doc["graph"] = {"role": s.role, "opset": s.opset, "target": s.target, "inputs": s.inputs, "outputs": s.outputs,
                    "weight_bytes": s.weight_bytes, "fusion": report.to_dict(), "fusion_lines": report.lines()}
    return doc
