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
from ..io.checkpoint import Checkpoint
from ..io.finite import cast_checked, check_finite
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

    `checkpoint` is the base; `sources` maps the plan's other expert sources to theirs. Each
    expert tensor is made by `sparsify.init.expert_weight` from the one dense buffer last read,
    so writing all of a role's experts reads the source weight once."""

    def __init__(self, checkpoint: Checkpoint, plan: UpcyclePlan, model: nn.Module, dtype: torch.dtype | None = None,
                 sources: dict[str, Checkpoint] | None = None, allow_nonfinite: bool = False):
        self.ckpt, self.plan, self.dtype, self.allow_nonfinite = checkpoint, plan, dtype, allow_nonfinite
        self.nonfinite: list[str] = []  # names of source tensors with NaN/Inf (converted when allowed)
        self.checkpoints = {"base": checkpoint, **(sources or {})}
        self.aliases = alias_groups(model)
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self._cached: tuple[tuple[str, str], torch.Tensor] | None = None

    def _source_name(self, name: str, ckpt: Checkpoint | None = None) -> str:
        ckpt = ckpt or self.ckpt
        for candidate in self.aliases.get(name, [name]):
            for n in (candidate, f"{self.prefix}.{candidate}", candidate.removeprefix(f"{self.prefix}.")):
                if n in ckpt:
                    return n
        raise SourceError(f"checkpoint '{ckpt.path}' lacks tensor '{name}' that the config requires")

    def _read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        """Tensor `name` of `ckpt`, checked for NaN/Inf once, as it is read."""
        t = ckpt.read(name)
        if not self.allow_nonfinite:
            check_finite(t, name, getattr(ckpt, "spec", None) or str(getattr(ckpt, "path", "the dense model")))
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            self.nonfinite.append(name)
        return t

    def _cast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        return cast_checked(t, self.dtype, name) if self.dtype is not None and t.is_floating_point() else t

    def plain(self, name: str) -> torch.Tensor:
        source = self._source_name(name)
        return self._cast(self._read(self.ckpt, source), source)

    def plain_dtype(self, name: str) -> torch.dtype:
        return _cast_dtype(self.ckpt.dtype(self._source_name(name)), self.dtype)

    def _checkpoint(self, source: str) -> Checkpoint:
        try:
            return self.checkpoints[source]
        except KeyError:
            raise SourceError(f"the plan reads experts from '{source}', which was not given") from None

    def _dense(self, site: FFNSite, role: str, source: str) -> torch.Tensor:
        # One source buffer serves all E experts: keep the last one read.
        ckpt = self._checkpoint(source)
        key = (source, self._source_name(site.weights[role], ckpt))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # release the previous buffer before reading the next
            dense = canonical_weight(site, role, self._read(ckpt, key[1])).contiguous()
            self._cached = (key, self._cast(dense, key[1]))
        return self._cached[1]

    def expert(self, site: FFNSite, role: str, e: int | str) -> torch.Tensor:
        layer = self.plan.layer(site)
        init = layer.shared if e == "shared" else layer.experts[e]
        return expert_weight(site, layer, e, role, self._dense(site, role, init.source), self.plan.seed)

    def expert_dtype(self, site: FFNSite, role: str) -> torch.dtype:
        return _cast_dtype(self.ckpt.dtype(self._source_name(site.weights[role])), self.dtype)

    def router(self, site: FFNSite) -> torch.Tensor:
        return router_init_weight(self.plan, site)
