"""`upcycle-ffn-onnx`: replace each selected FFN of an ONNX graph by an MoE of its copies.

The MoE is the standard-ops form of `sparsify.onnx.moe_graph` (run `fuse-moe-ort` after it for
ONNX Runtime's fused operator). Experts and routers start as the plan's layer plans say, by the
formulas of `sparsify.init`: the same deterministic initial values as the PyTorch path.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import torch

from ...errors import OptionError
from ...init import expert_weight, router_init_weight
from ...onnx.builder import GraphBuilder
from ...onnx.moe_graph import MoEGraphSpec, MoEWeights, emit_moe
from ...plan import UpcyclePlan
from .find_ffn import OnnxFFN
from .fuse_moe_ort import SITE_KEY

__all__ = ["UpcycleFFNOnnx"]


class UpcycleFFNOnnx(ir.passes.InPlacePass):
    """Rewrite the FFNs the plan selects (found by `find-ffn-onnx`) into MoE subgraphs."""

    name = "upcycle-ffn-onnx"

    def __init__(self, found: list[OnnxFFN], plan: UpcyclePlan) -> None:
        super().__init__()
        self.found, self.plan = found, plan

    def requires(self, model: ir.Model) -> None:
        if not self.plan.layers:
            raise ir.passes.PreconditionError("upcycle-ffn-onnx needs the plan's MoE settings")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = set(self.plan.selected)
        for ffn in self.found:
            if ffn.site.path in chosen:
                self._replace(model.graph, ffn)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _replace(self, graph: ir.Graph, ffn: OnnxFFN) -> None:
        site = ffn.site
        layer = self.plan.layer(site)
        cfg = layer.moe
        e = cfg.num_experts
        if layer.shared is not None:
            raise OptionError("ONNX-native upcycling has no shared experts; upcycle the checkpoint instead")
        dtype = ir.DataType(ir.convenience.get_const_tensor(ffn.trace.gate.weight).dtype)

        def stacked(role: str, dense: np.ndarray) -> np.ndarray:
            # each expert by the formula every executor uses, on the canonical [out, in] layout
            canonical = torch.from_numpy(np.array(dense.T if role.startswith("w") else dense, order="C")).float()
            copies = [expert_weight(site, layer, k, role, canonical, self.plan.seed).numpy() for k in range(e)]
            stack = np.stack([c.T if role.startswith("w") else c for c in copies])
            return stack.astype(dtype.numpy())

        values: dict[str, ir.Value] = {}

        def initializer(role: str, array: np.ndarray) -> ir.Value:
            v = ir.Value(name=f"{site.path}.{role}", const_value=ir.tensor(array))
            v.shape, v.dtype = ir.Shape(array.shape), ir.DataType(v.const_value.dtype)
            graph.register_initializer(v)
            values[role] = v
            return v

        for role, p in ffn.projections().items():
            initializer(f"experts.{role}", stacked(role, p.matrix()))
            if p.bias is not None:
                b = p.bias_array()
                bias = f"b{role[1]}"
                initializer(f"experts.{bias}", stacked(bias, b)[:, None, :].copy())
        initializer("router.weight", router_init_weight(self.plan, site).numpy().T.copy())

        op = GraphBuilder(metadata={SITE_KEY: site.path})
        spec = MoEGraphSpec.from_config(cfg, site.activation, site.form, site.hidden_size, dtype)
        get = values.get
        out = emit_moe(op, ffn.input, spec, MoEWeights(get("router.weight"), get("experts.w1"), get("experts.w2"),
                                                        get("experts.w3"), get("experts.b1"), get("experts.b2"),
                                                        get("experts.b3")))
        graph.insert_before(ffn.down.nodes[-1], op.nodes)
        old = ffn.output
        if old in graph.outputs:
            out.name, old.name = old.name, None
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        # a graph without inferred types (hand-written, or not shape-inferred) leaves the old
        # value untyped; the MoE computes in the weights' dtype, which a typed graph agrees with
        out.dtype, out.shape = old.dtype or dtype, old.shape
