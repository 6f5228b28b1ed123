"""sparsify: turn dense transformer checkpoints into Mixture-of-Experts models.

    import sparsify
    moe = sparsify.upcycle("demo:t5", experts=8, top_k=2, every=2)
    sparsify.save(moe, "t5-moe")
    again = sparsify.load("t5-moe")

    from sparsify import PassManager, passes
    pm = PassManager([passes.FindFFN(), passes.SelectLayers(every=2), passes.UpcycleFFN(experts=8)])
    result = pm.run(model)          # result.model, result.plan

    recipe = sparsify.Recipe.load("moe.yaml")     # or sparsify.Recipe(experts=32, decoder={"top_k": 2})
    moe = sparsify.upcycle("demo:t5", recipe=recipe)
"""

__version__ = "0.1.0"

from . import passes  # noqa: E402
from .api import load, save, upcycle  # noqa: E402
from .errors import SparsifyError  # noqa: E402
from .model_recipe import Recipe  # noqa: E402
from .moe import MoEConfig, SparseMoE, aux_losses  # noqa: E402
from .passes import PassManager  # noqa: E402
from .plan import FFNSite, UpcyclePlan  # noqa: E402

__all__ = [
    "__version__",
    "upcycle",
    "load",
    "save",
    "aux_losses",
    "PassManager",
    "passes",
    "MoEConfig",
    "SparseMoE",
    "FFNSite",
    "UpcyclePlan",
    "Recipe",
    "SparsifyError",
]
