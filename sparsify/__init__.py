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

from __future__ import annotations

from .lazy_names import lazy_names

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "upcycle",
    "load",
    "save",
    "aux_losses",
    "router_stats",
    "PassManager",
    "passes",
    "MoEConfig",
    "SparseMoE",
    "FFNSite",
    "UpcyclePlan",
    "Recipe",
    "SparsifyError",
]

# Where each public name lives. They are imported on first use, so that `import sparsify` (and
# with it `sparsify --help`) does not import torch and transformers (seconds) before it needs them.
__getattr__, __dir__ = lazy_names(__name__, {
    "upcycle": ".api", "load": ".api", "save": ".api",
    "aux_losses": ".moe", "MoEConfig": ".moe", "SparseMoE": ".moe",
    "PassManager": ".passes", "passes": ".passes",
    "FFNSite": ".plan", "UpcyclePlan": ".plan",
    "Recipe": ".model_recipe",
    "router_stats": ".training",
    "SparsifyError": ".errors",
}, __all__)
