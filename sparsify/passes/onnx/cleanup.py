"""Shared clean-up of ONNX graphs: constant folding and dead-node removal (onnxscript, onnx-ir)."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

__all__ = ["FoldWeightLayouts", "cleanup"]

# Ops that only move weights around. Folding them whatever their size turns the transposes
# and slices written at export into plain initializers in the layout the MatMuls read.
_LAYOUT_OPS = frozenset({"Transpose", "Unsqueeze", "Squeeze", "Reshape", "Slice", "Concat", "Identity"})


def _fold_layout(node: ir.Node) -> bool | None:
    if node.domain in ("", "ai.onnx") and node.op_type in _LAYOUT_OPS:
        data = node.inputs[0] if node.inputs else None
        if data is not None and ir.convenience.get_const_tensor(data) is not None:
            return True
    return None  # onnxscript's default rules and size limits


class FoldWeightLayouts(ir.passes.InPlacePass):
    """Constant folding (onnxscript's folder), with weight layout ops folded at any size."""

    name = "fold-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # The folder warns "Evaluation failed" when onnx's reference evaluator cannot fold a node
        # (BERT's static-shape mask expansion); the node then stays, which is correct, so the
        # warning says nothing to the user
        log = logging.getLogger("onnxscript.optimizer._constant_folding")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            result = onnxscript.optimizer.fold_constants(model, output_size_limit=1 << 62, should_fold=_fold_layout)
        finally:
            log.setLevel(level)
        return ir.passes.PassResult(model, modified=bool(result.modified))


def cleanup() -> ir.passes.PassManager:
    """Fold constants, lift them to initializers, drop unused nodes, initializers and opsets."""
    return ir.passes.PassManager(
        [
            FoldWeightLayouts(),
            common.LiftConstantsToInitializersPass(size_limit=16),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedOpsetsPass(),
        ]
    )
