"""`upcycle-ffn`: turn each selected FFN into a router plus E experts that start as its copies."""

from __future__ import annotations

from ..errors import OptionError
from ..moe import MoEConfig
from ..rewrite import apply_plan
from .infra import Pass, PassContext, PostconditionError, PreconditionError

__all__ = ["UpcycleFFN"]


class UpcycleFFN(Pass):
    """Record the MoE settings in the plan and rewrite the model's selected FFNs in place.

    Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN
    (plus optional Gaussian `noise` of that std), the router as normal(0, `router_init_std`).
    With `router="topk"`, `normalize=True` and no capacity factor the result returns exactly
    what the dense model returned.
    """

    name = "upcycle-ffn"

    def __init__(
        self,
        experts: int = 8,
        top_k: int | None = 2,
        router: str = "topk",
        normalize: bool = True,
        noise: float = 0.0,
        router_init_std: float = 0.02,
        seed: int = 0,
        capacity_factor: float | None = None,
        **moe_options,
    ):
        if router == "switch" and top_k == 2:
            top_k = None  # the signature's default k=2 does not apply to switch routing (top-1)
        self.config = MoEConfig(
            num_experts=experts,
            top_k=top_k,
            router=router,
            normalize=normalize,
            capacity_factor=capacity_factor,
            **moe_options,
        )
        if noise < 0:
            raise OptionError(f"--noise must be non-negative, got {noise}")
        if router_init_std < 0:
            raise OptionError(f"router_init_std must be non-negative, got {router_init_std}")
        self.noise, self.router_init_std, self.seed = float(noise), float(router_init_std), int(seed)

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.sites:
            raise PreconditionError("upcycle-ffn needs FFN sites; run find-ffn before it")
        if not ctx.plan.selected:
            raise OptionError("no FFN layer was selected; with --every N the model needs at least N FFNs per stack")
        if self.config.router == "expert-choice":
            causal = [s.path for s in ctx.plan.selected_sites if s.causal]
            if causal:
                raise OptionError(
                    f"--router expert-choice cannot be used on the causal (decoder) layer '{causal[0]}': "
                    "experts would choose tokens using later tokens; use topk or switch, or select encoder layers only"
                )

    def call(self, ctx: PassContext) -> bool:
        ctx.plan.moe = self.config
        ctx.plan.init.update(noise=self.noise, router_init_std=self.router_init_std, seed=self.seed)
        apply_plan(ctx.model, ctx.plan)
        return True

    def ensures(self, ctx: PassContext) -> None:
        for site in ctx.plan.selected_sites:
            if type(ctx.model.get_submodule(site.path)).__name__ != "SparseMoE":
                raise PostconditionError(f"upcycle-ffn left '{site.path}' unconverted")
