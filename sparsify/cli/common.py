"""Helpers shared by the commands: loading any model argument, parameter counts, tables."""

from __future__ import annotations

import torch.nn as nn
from rich.table import Table

from ..formats.registry import output_format
from ..io.sources import Source, load_source, resolve_source
from ..plan import UpcyclePlan

__all__ = ["load_any", "count_params", "sites_table", "parse_layers", "human", "layer_summary", "routing_summary"]


def load_any(spec: str) -> tuple[nn.Module, Source]:
    """A dense source or a sparsify output (any format), as a model."""
    src = resolve_source(spec)
    if src.path is not None and output_format(src.path):
        from ..api import load

        return load(src.path), src
    return load_source(src)


def count_params(model: nn.Module) -> int:
    """Unique parameters of `model` (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def parse_layers(text: str | None) -> list[int] | None:
    """'1,3,5' -> [1, 3, 5]."""
    if text is None:
        return None
    from ..errors import OptionError

    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise OptionError(f"--layers takes comma-separated FFN indices like 1,3,5, got {text!r}") from None


def layer_summary(plan: UpcyclePlan, site) -> str:
    """One MoE layer's settings in a few words: '8 experts, topk k=2' (+ the scheme when not plain copies)."""
    layer = plan.layer(site)
    moe = layer.moe
    text = f"{moe.num_experts} experts, {moe.router} k={moe.top_k}"
    if layer.shared is not None:
        text += " + shared"
    return text if layer.scheme == "copy" else f"{text} ({layer.scheme})"


def routing_summary(plan: UpcyclePlan) -> str:
    """The routing of every MoE layer in a few words, or 'per-layer settings' when they differ."""
    moe = plan.moe
    if moe is None:
        return "per-layer settings (see sparsify inspect)"
    return f"{moe.num_experts} experts each, router {moe.router}, top-{moe.top_k}"


def sites_table(plan: UpcyclePlan, title: str) -> Table:
    """The FFN sites of `plan` as a rich table."""
    table = Table(title=title, title_justify="left")
    for col in ("stack", "#", "module", "form", "activation", "hidden x ffn", "MoE"):
        table.add_column(col)
    for s in plan.sites:
        moe = layer_summary(plan, s) if s.path in plan.layers else ""
        index = ",".join(map(str, s.indices)) if s.calls else str(s.index)  # a shared FFN runs at several layers
        table.add_row(s.stack or "-", index, s.path + (f" (+ {s.exit_path})" if s.exit_path else ""),
                      s.form, s.activation, f"{s.hidden_size} x {s.intermediate_size}", moe)
    return table


