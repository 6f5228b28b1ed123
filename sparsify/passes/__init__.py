"""Passes over a model and its plan, and the manager that runs them.

    from sparsify import PassManager, passes
    pm = PassManager([passes.FindFFN(), passes.SelectLayers(every=2), passes.UpcycleFFN(experts=8)])
    result = pm.run(model)   # result.model, result.plan
"""

from .find_ffn import FindFFN
from .fuse_dispatch_combine import FuseDispatchCombine
from .init_router import InitRouter
from .infra import Pass, PassContext, PassManager, PassResult, PostconditionError, PreconditionError
from .partition_experts import PartitionExperts
from .select_layers import SelectLayers
from .upcycle_ffn import UpcycleFFN

__all__ = [
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "PreconditionError",
    "PostconditionError",
    "FindFFN",
    "SelectLayers",
    "UpcycleFFN",
    "InitRouter",
    "FuseDispatchCombine",
    "PartitionExperts",
]
