"""`upcycle-ffn-onnx`: replace each selected FFN of an ONNX graph by an MoE of its copies.

The MoE is the standard-ops form of `sparsify.onnx.moe_graph` (run `fuse-moe-ort` after it for
ONNX Runtime's fused operator). Experts start as copies of the FFN (plus the plan's noise) and
the router from `sparsify.init`, the same deterministic initial values as the PyTorch path.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...init import expert_noise, router_weight
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
        if self.plan.moe is None:
            raise ir.passes.PreconditionError("upcycle-ffn-onnx needs the plan's MoE settings")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = set(self.plan.selected)
        for ffn in self.found:
            if ffn.site.path in chosen:
                self._replace(model.graph, ffn)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _replace(self, graph: ir.Graph, ffn: OnnxFFN) -> None:
        site, cfg, init = ffn.site, self.plan.moe, self.plan.init
        e, h = cfg.num_experts, site.hidden_size
        noise, seed = float(init.get("noise", 0.0)), int(init.get("seed", 0))
        std = float(init.get("router_init_std", 0.02))
        dtype = ir.DataType(ir.convenience.get_const_tensor(ffn.trace.gate.weight).dtype)

        def stacked(role: str, matrix: np.ndarray) -> np.ndarray:
            # expert copies in MatMul layout [E, in, out]; noise is drawn in the [out, in] layout
            # of `Experts`, as the PyTorch executor draws it
            copies = []
            for k in range(e):
                m = matrix.astype(np.float32)
                if noise > 0:
                    m = m + expert_noise(site.path, role, k, matrix.T.shape, noise, seed).numpy().T
                copies.append(m)
            return np.stack(copies).astype(dtype.numpy())

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
                b = ir.convenience.get_const_tensor(p.bias).numpy()
                initializer(f"experts.b{role[1]}", np.broadcast_to(b, (e, 1, b.shape[-1])).copy())
        initializer("router.weight", router_weight(site.path, e, h, std, seed).numpy().T.copy())

        op = GraphBuilder(metadata={SITE_KEY: site.path})
        spec = MoEGraphSpec.from_config(cfg, site.activation, site.form, h, dtype)
        get = values.get
        out = emit_moe(op, ffn.input, spec, MoEWeights(get("router.weight"), get("experts.w1"), get("experts.w2"),
                                                        get("experts.w3"), get("experts.b1"), get("experts.b2"),
                                                        get("experts.b3")))
        graph.insert_before(ffn.down.nodes[-1], op.nodes)
        old = ffn.output
        if old in graph.outputs:
            out.name, old.name = old.name, None
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        out.dtype, out.shape = old.dtype, old.shape
