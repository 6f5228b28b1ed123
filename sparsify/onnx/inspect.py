"""What an ONNX file holds, for `sparsify inspect model.onnx`: its FFN sites and MoE layers.

Graphs written by sparsify (export, ONNX-native upcycle) carry the plan and the fusion report in
their `sparsify` metadata; the sites and MoE layers are read from there. Any other graph is
searched for FFNs with `find-ffn-onnx`, the pass that ONNX-native upcycling runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from ..formats.onnx import METADATA_KEY, read_onnx
from ..passes.onnx.find_ffn import FindFFNOnnx
from ..plan import UpcyclePlan

__all__ = ["OnnxSummary", "describe_onnx", "graph_plan"]


@dataclass
class OnnxSummary:
    """An ONNX graph as sparsify sees it."""

    path: Path
    plan: UpcyclePlan  # the sites of this graph; `selected` are its MoE layers
    upcycled: bool
    role: str  # model | encoder | decoder
    opset: int | None
    target: str | None  # ort | standard, for graphs sparsify wrote
    inputs: list[str]
    outputs: list[str]
    params: int  # elements of the initializers
    weight_bytes: int
    fusion: dict[str, Any] = field(default_factory=dict)  # fused: [...], left: {site: reason}


def graph_plan(plan: UpcyclePlan, role: str) -> UpcyclePlan:
    """The part of a model's plan that one graph holds: an encoder-decoder model's plan covers
    both graphs, and its sites' module paths name their stack (`encoder.block.1...`)."""
    if role not in ("encoder", "decoder"):
        return plan
    keep = [s for s in plan.sites if role in s.path.split(".")]
    paths = {s.path for s in keep}
    return UpcyclePlan(sites=keep, rejected=plan.rejected, selected=[p for p in plan.selected if p in paths],
                       moe=plan.moe, init=plan.init, source=plan.source)


def describe_onnx(path: str | Path) -> OnnxSummary:
    """The FFN sites, MoE layers and sizes of the ONNX graph at `path`."""
    model = read_onnx(path)
    meta = _metadata(model)
    role = meta.get("graph", "model")
    plan = UpcyclePlan.from_dict(meta["plan"]) if meta.get("plan") else None
    if plan is not None:
        plan = graph_plan(plan, role)
    else:
        find = FindFFNOnnx()
        find(model)
        plan = UpcyclePlan(sites=[f.site for f in find.found], rejected=find.rejected)
    consts = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    return OnnxSummary(
        path=Path(path), plan=plan, upcycled=bool(plan.selected and plan.moe), role=role,
        opset=model.opset_imports.get("", model.opset_imports.get("ai.onnx")), target=meta.get("target"),
        inputs=[v.name for v in model.graph.inputs], outputs=[v.name for v in model.graph.outputs],
        params=sum(t.size for t in consts), weight_bytes=sum(t.nbytes for t in consts), fusion=meta.get("fusion") or {},
    )


def _metadata(model: ir.Model) -> dict[str, Any]:
    text = model.metadata_props.get(METADATA_KEY)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
