"""`StreamedMoE`: an MoE layer whose experts stay in the output directory until it runs.

Each forward reads the layer's experts (the stacked tensors of `SparseMoE`), runs a `SparseMoE`
made of them and the router it holds, and lets them go, so a model of such layers holds its
dense parts and one layer's experts at a time. The router is held (it is E x H floats), which
also keeps forward hooks on it working across calls, as profiling needs.

The layers compute with the `reference` kernels by default: the `cpu` backend packs a second
copy of each layer's weights for its GEMM, made once per weight and kept while the weight
lives, which a layer read afresh on every call would pay on every call, at twice the layer's
memory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..kernels import check_backend
from ..layer_plan import LayerPlan
from ..moe import Router, SparseMoE
from ..moe.config import MoEConfig
from ..plan import FFNSite, UpcyclePlan
from ..rewrite import build_moe, install_site

__all__ = ["StreamedMoE", "Observer", "install_streamed"]

# observe(layer, hidden_states, args, kwargs, output): called after each forward
Observer = Callable[["StreamedMoE", torch.Tensor, tuple, dict, torch.Tensor], None]


class StreamedMoE(nn.Module):
    """A drop-in for the `SparseMoE` of `site` whose experts come from `load()` on each call
    (a dict of `experts.*` and `shared.*` tensors, as `sparsify.streaming.reader.read_site`
    makes). `observe`, when given, sees each call's input and output."""

    def __init__(self, site: FFNSite, layer: LayerPlan, router: Router, load: Callable[[], dict[str, torch.Tensor]],
                 backend: str = "reference", observe: Observer | None = None):
        super().__init__()
        self.site, self.layer, self.router = site, layer, router
        self.backend, self.observe = backend, observe
        self._load = load
        self.calls = 0

    @property
    def config(self) -> MoEConfig:
        """The routing configuration."""
        return self.router.config

    def materialise(self) -> SparseMoE:
        """This layer's `SparseMoE` with its experts read now (the caller lets it go)."""
        state = self._load()
        w1 = state["experts.w1"]
        moe = build_moe(self.site, self.layer, w1.dtype, torch.device("meta"))
        moe.router = self.router
        result = moe.load_state_dict(state, strict=False, assign=True)
        left = [k for k in result.missing_keys if not k.startswith("router.")]
        if left or result.unexpected_keys:
            raise RuntimeError(f"{self.site.path}: the layer read lacks {left} or has extra {result.unexpected_keys}")
        moe.backend = check_backend(self.backend, w1.device, w1.dtype, self.site.activation)
        return moe.train(self.training)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moe = self.materialise()
        self.calls += 1
        out = moe(hidden_states)
        del moe  # the experts go before anything else runs
        if self.observe is not None:
            self.observe(self, hidden_states, args, kwargs, out)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"streamed, router={c.router}, top_k={c.top_k}, experts={c.num_experts}, backend={self.backend}"


def install_streamed(model: nn.Module, plan: UpcyclePlan, make: Callable[[FFNSite], StreamedMoE]) -> dict[str, nn.Module]:
    """Put `make(site)` in place of each selected site of `model`, as `sparsify.rewrite.apply_plan`
    puts an MoE there (`install_site`: the exit projection and the modules between become
    identities, the plan's attribute overrides are set); returns the modules replaced, by path."""
    replaced: dict[str, nn.Module] = {}
    for site in plan.selected_sites:
        replaced.update(install_site(model, site, make(site)))
    return replaced
