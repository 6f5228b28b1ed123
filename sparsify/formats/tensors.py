"""The tensors of a converted model, whatever holds them.

Output formats name and arrange tensors; they read them through a `TensorSource`:

- `ModelTensors`: a converted model in memory (experts already copied, noise added);
- `SourceTensors`: a dense checkpoint plus the plan, producing expert copies, noise and router
  weights on the fly, one source buffer at a time (the streaming executor).

Both produce the same bytes for the same plan, which is what makes streamed output equal to
the in-memory path's.
"""

from __future__ import annotations

import abc

import torch
import torch.nn as nn

from ..errors import SourceError
from ..init import expert_weight, router_init_weight
from ..io.finite import all_finite, cast_checked, check_finite
from ..io.tensor_names import TensorNames
from ..merge import Weights, average, distinct, stored_name
from ..plan import FFNSite, UpcyclePlan
from ..rewrite import canonical_weight

__all__ = ["TensorSource", "ModelTensors", "SourceTensors", "alias_groups"]


def alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """State-dict name -> every name of the same (tied) tensor, the first being the stored one."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {n: names for names in groups.values() for n in names}


class TensorSource(abc.ABC):
    """What formats read: plain tensors by state-dict name, expert copies, router weights."""

    @abc.abstractmethod
    def plain(self, name: str) -> torch.Tensor:
        """The tensor `name` of the converted model's state dict (not an MoE tensor)."""

    @abc.abstractmethod
    def plain_dtype(self, name: str) -> torch.dtype:
        """dtype of `plain(name)` without reading it."""

    @abc.abstractmethod
    def expert(self, site: FFNSite, role: str, e: int | str) -> torch.Tensor:
        """Expert e's weight `role` (w1/w2/w3/b1/b2/b3) in canonical layout ([out, in]);
        `e="shared"` is the layer's shared expert."""

    @abc.abstractmethod
    def expert_dtype(self, site: FFNSite, role: str) -> torch.dtype:
        """dtype of the expert tensors of `role`."""

    @abc.abstractmethod
    def router(self, site: FFNSite) -> torch.Tensor:
        """The router weight [E, H], float32."""


def _cast_dtype(dtype: torch.dtype, to: torch.dtype | None) -> torch.dtype:
    return to if to is not None and dtype.is_floating_point else dtype


class ModelTensors(TensorSource):
    """Tensors of a converted model in memory (floating tensors cast to `dtype` when given)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        self.model, self.dtype = model, dtype
        self.state = model.state_dict()

    def plain(self, name: str) -> torch.Tensor:
        return self.state[name]

    def plain_dtype(self, name: str) -> torch.dtype:
        return _cast_dtype(self.state[name].dtype, self.dtype)

    def expert(self, site: FFNSite, role: str, e: int | str) -> torch.Tensor:
        moe = self.model.get_submodule(site.path)
        if e == "shared":
            return getattr(moe.shared, role).detach()
        return getattr(moe.experts, role)[e].detach()

    def expert_dtype(self, site: FFNSite, role: str) -> torch.dtype:
        return _cast_dtype(getattr(self.model.get_submodule(site.path).experts, role).dtype, self.dtype)

    def router(self, site: FFNSite) -> torch.Tensor:
        return self.model.get_submodule(site.path).router.weight.detach()


class SourceTensors(TensorSource):
    """Tensors produced from dense checkpoints and the plan, optionally cast to `dtype`.

    `checkpoint` is the base, seen through the dense model's names (`TensorNames`: transformers'
    renamings, conversions and tied weights); `sources` maps the plan's other expert sources to
    theirs (a `TensorNames`, a `Checkpoint`, or any `sparsify.merge.Weights`). Each expert tensor
    is made by `sparsify.init.expert_weight` from the dense buffers of the (site, role) being
    written, kept until the next one, so writing all of a role's experts reads each source's
    weight once. With `plan.merge_base == "average"` every other floating tensor is the mean over
    the base and the distinct sources (`sparsify.merge.average`), read one at a time."""

    def __init__(self, checkpoint: TensorNames | Weights, plan: UpcyclePlan, model: nn.Module,
                 dtype: torch.dtype | None = None, sources: dict[str, Weights] | None = None,
                 allow_nonfinite: bool = False):
        self.ckpt, self.plan, self.dtype, self.allow_nonfinite = checkpoint, plan, dtype, allow_nonfinite
        self.nonfinite: list[str] = []  # names of source tensors with NaN/Inf (converted when allowed)
        self.checkpoints: dict[str, Weights] = {"base": checkpoint, **(sources or {})}
        self.aliases = alias_groups(model)
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        # a parametrised activation's parameters move into the MoE; they are read where the source has them
        self.moved = {f"{site.path}.{part}.act_params.{name}": source for site in plan.selected_sites
                      for name, source in site.activation_params.items() for part in ("experts", "shared")}
        self._cached: tuple[tuple[str, str], dict[str, torch.Tensor]] | None = None
        merged = [self._checkpoint(n) for n in plan.sources] if plan.merge_base == "average" else []
        self.merged = distinct([checkpoint, *merged])

    def _source_name(self, name: str, ckpt: Weights) -> str:
        """The name to read the dense model's tensor `name` by in `ckpt`: a `TensorNames` takes
        model names; any other store (an expert source) is matched by aliases and prefix."""
        name = self.moved.get(name, name)
        if isinstance(ckpt, TensorNames):
            return name
        stored = stored_name(ckpt, name, self.aliases, self.prefix)
        if stored is None:
            raise SourceError(f"checkpoint '{ckpt.path}' lacks tensor '{name}' that the config requires")
        return stored

    def _read(self, ckpt: Weights, name: str) -> torch.Tensor:
        """Tensor `name` of `ckpt`, checked for NaN/Inf once, as it is read."""
        t = ckpt.read(name)
        if not self.allow_nonfinite:
            check_finite(t, name, getattr(ckpt, "spec", None) or str(getattr(ckpt, "path", "the dense model")))
        elif not all_finite(t):
            self.nonfinite.append(name)
        return t

    def _cast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return cast_checked(t, self.dtype, name) if self.dtype is not None and t.is_floating_point() else t

    def plain(self, name: str) -> torch.Tensor:
        self._cached = None  # the experts of the last site are written; release their buffers
        source = self._source_name(name, self.ckpt)
        if len(self.merged) > 1 and self.ckpt.dtype(source).is_floating_point:
            return self._cast(average([lambda w=w: self._read(w, self._source_name(name, w)) for w in self.merged]), source)
        return self._cast(self._read(self.ckpt, source), source)

    def plain_dtype(self, name: str) -> torch.dtype:
        return _cast_dtype(self.ckpt.dtype(self._source_name(name, self.ckpt)), self.dtype)

    def _checkpoint(self, source: str) -> Weights:
        try:
            return self.checkpoints[source]
        except KeyError:
            raise SourceError(f"the plan reads experts from '{source}', which was not given") from None

    def _dense(self, site: FFNSite, role: str, source: str) -> torch.Tensor:
        # The buffers of one (site, role) serve all E experts: keep them until the next role.
        key = (site.path, role)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # release the previous buffers before reading the next
            self._cached = (key, {})
        held = self._cached[1]
        if source not in held:
            ckpt = self._checkpoint(source)
            name = self._source_name(site.weights[role], ckpt)
            held[source] = self._cast(canonical_weight(site, role, self._read(ckpt, name)).contiguous(), name)
        return held[source]

    def expert(self, site: FFNSite, role: str, e: int | str) -> torch.Tensor:
        layer = self.plan.layer(site)
        init = layer.shared if e == "shared" else layer.experts[e]
        return expert_weight(site, layer, e, role, self._dense(site, role, init.source), self.plan.seed)

    def expert_dtype(self, site: FFNSite, role: str) -> torch.dtype:
        return _cast_dtype(self.ckpt.dtype(site.weights[role]), self.dtype)

    def router(self, site: FFNSite) -> torch.Tensor:
        return router_init_weight(self.plan, site)
