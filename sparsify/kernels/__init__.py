"""Token dispatch / expert FFN / combine kernels, one backend per module."""

from .dispatch import BACKENDS, get_backend, moe_ffn

__all__ = ["BACKENDS", "get_backend", "moe_ffn"]
