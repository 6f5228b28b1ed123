"""`fuse-dispatch-combine`: run every MoE layer on the fastest kernels for its device.

A lowering pass: it changes no weight and no plan, only which `sparsify.kernels` backend each
`SparseMoE` dispatches, computes and combines with.

    PassManager([passes.FuseDispatchCombine(backend="auto")]).run(model).model
"""

from __future__ import annotations

from ..errors import OptionError
from ..kernels import BACKENDS, check_backend, get_backend
from ..moe import SparseMoE
from .infra import Pass, PassContext, PostconditionError

__all__ = ["FuseDispatchCombine"]


class FuseDispatchCombine(Pass):
    """Set the kernel backend of every `SparseMoE` in the model.

    `backend="auto"` picks, per layer, the best backend for the device and dtype of its experts:
    CPU -> "cpu", CUDA -> "triton" (when triton is installed), anything else -> "reference".
    A name ("reference", "cpu", "triton") is applied to every layer; a layer it cannot run is an
    `OptionError` naming the layer and the reason. Layers still on the meta device keep the
    requested name ("auto" is then resolved when they run). After the pass, `chosen` maps each
    layer's path to its backend.
    """

    name = "fuse-dispatch-combine"

    def __init__(self, backend: str = "auto"):
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, before any model is loaded
        self.backend = backend
        self.chosen: dict[str, str] = {}

    def call(self, ctx: PassContext) -> bool:
        self.chosen, modified = {}, False
        for path, module in ctx.model.named_modules():
            if not isinstance(module, SparseMoE):
                continue
            w = module.experts.w1
            if w.device.type == "meta":
                name = self.backend
            else:
                try:
                    name = check_backend(self.backend, w.device, w.dtype, module.experts.activation)
                except OptionError as err:
                    raise OptionError(f"MoE layer '{path}': {err}") from None
            modified |= module.backend != name
            module.backend = name
            self.chosen[path] = name
        return modified

    def ensures(self, ctx: PassContext) -> None:
        for path, module in ctx.model.named_modules():
            if isinstance(module, SparseMoE) and module.backend not in (*BACKENDS, "auto"):
                raise PostconditionError(f"fuse-dispatch-combine left '{path}' on unknown backend {module.backend!r}")

    def __repr__(self) -> str:
        return f"FuseDispatchCombine(backend={self.backend!r})"
