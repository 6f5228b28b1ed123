"""`select-layers`: choose which FFN sites become MoE layers."""

from __future__ import annotations

from typing import Sequence

from ..errors import OptionError
from .infra import Pass, PassContext, PreconditionError

__all__ = ["SelectLayers", "select_layers"]


def select_layers(sites, every: int | None = 2, layers: Sequence[int] | None = None) -> list[str]:
    """Paths of the sites to convert. Within each stack, FFN number j (0-based) is chosen when
    `j % every == every - 1` (every=2: 1, 3, 5, ..., as in Switch Transformer), or when j is in
    `layers`. A shared FFN (one module run at several layers, ALBERT) is one MoE for all of its
    calls, chosen when any of its layers is."""
    if layers is not None:
        layers = sorted(set(int(j) for j in layers))
        if not layers:
            raise OptionError("--layers is empty; give FFN indices like 1,3,5")
        sizes: dict[str, int] = {}
        for s in sites:
            sizes[s.stack] = sizes.get(s.stack, 0) + len(s.indices)
        largest = max(sizes.values(), default=0)
        bad = [j for j in layers if j < 0 or j >= largest]
        if bad:
            counts = ", ".join(f"{n} in {k or 'the model'}" for k, n in sizes.items())
            raise OptionError(
                f"--layers {','.join(map(str, bad))} out of range: the FFN stacks have {counts} "
                "(numbered from 0)"
            )
        chosen = set(layers)
        return [s.path for s in sites if chosen.intersection(s.indices)]
    if every is None or int(every) < 1:
        raise OptionError(f"--every must be 1 or more, got {every}")
    return [s.path for s in sites if any(j % every == every - 1 for j in s.indices)]


class SelectLayers(Pass):
    """Select the FFNs to convert: `SelectLayers(every=2)` or `SelectLayers(layers=[1, 3, 5])`."""

    name = "select-layers"

    def __init__(self, every: int | None = 2, layers: Sequence[int] | None = None):
        if layers is None and (every is None or int(every) < 1):
            raise OptionError(f"--every must be 1 or more, got {every}")
        self.every, self.layers = every, layers

    def requires(self, ctx: PassContext) -> None:
        if not ctx.plan.sites:
            raise PreconditionError("select-layers needs FFN sites; run find-ffn before it")

    def call(self, ctx: PassContext) -> bool:
        ctx.plan.selected = select_layers(ctx.plan.sites, self.every, self.layers)
        ctx.plan.selection = {"every": None if self.layers is not None else self.every,
                              "layers": list(self.layers) if self.layers is not None else None}
        return False

    def __repr__(self) -> str:
        return f"SelectLayers(layers={self.layers})" if self.layers is not None else f"SelectLayers(every={self.every})"
