"""Token dispatch / expert FFN / combine kernels.

The ops, one per file: `permute` (group pairs by expert), `grouped_ffn` (each expert's FFN on its
segment), `combine` (weighted un-permute); and `moe_ffn`, all three fused as far as a backend can.
Backends (`BACKENDS`): `reference` (plain torch, the oracle), `cpu` (expert-parallel over the
cores), `triton` (CUDA GPUs: gather, activation and gate fused into the first grouped GEMM,
weighted scatter-combine into the second; runs on CPU under `TRITON_INTERPRET=1` for testing).
`"auto"` picks the best one for a device.
"""

from .combine import combine
from .dispatch import AUTO, BACKENDS, check_backend, choose_backend, get_backend, moe_ffn
from .grouped_ffn import grouped_ffn
from .permute import permute

__all__ = [
    "BACKENDS",
    "AUTO",
    "get_backend",
    "choose_backend",
    "check_backend",
    "moe_ffn",
    "permute",
    "grouped_ffn",
    "combine",
]
