"""Passes over ONNX graphs (onnx-ir `InPlacePass`es), named like their PyTorch counterparts.

    find-ffn-onnx      FFN sites of a graph (dense and gated forms, any activation spelling)
    upcycle-ffn-onnx   selected FFNs -> standard-ops MoE of their copies
    fuse-moe-ort       standard-ops MoE -> one com.microsoft.MoE node where ONNX Runtime can
    fold-constants     shared clean-up (see `cleanup()`)
"""

from .cleanup import FoldWeightLayouts, cleanup
from .find_ffn import FindFFNOnnx, OnnxFFN, find_ffns
from .fuse_moe_ort import FuseMoEOrt, FusionReport, moe_layout_problem
from .upcycle_ffn import UpcycleFFNOnnx

__all__ = [
    "FindFFNOnnx",
    "OnnxFFN",
    "find_ffns",
    "UpcycleFFNOnnx",
    "FuseMoEOrt",
    "FusionReport",
    "moe_layout_problem",
    "FoldWeightLayouts",
    "cleanup",
]
