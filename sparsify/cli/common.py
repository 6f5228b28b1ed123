"""Helpers shared by the commands: loading any model argument, and the plan as the commands show it.

The MoE settings of a site are read through `site_moe` only, so that the commands follow the
plan's layout (one setting for all sites today) from this one place. Nothing here imports torch
at module level: every command module imports this one while `--help` is answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from ..units import format_count

if TYPE_CHECKING:
    import torch.nn as nn

    from ..io.sources import Source
    from ..moe.config import MoEConfig
    from ..plan import FFNSite, UpcyclePlan

__all__ = ["load_any", "count_params", "parse_layers", "site_moe", "plan_moes", "moe_text", "moe_dict",
           "site_rows", "sites_table", "param_counts", "params_from_total", "counts_text", "cache_note"]


def load_any(spec: str) -> tuple[nn.Module, Source]:
    """A dense source or a sparsify output (any format), as a model."""
    from ..formats.registry import output_format
    from ..io.sources import load_source, resolve_source

    src = resolve_source(spec)
    if src.path is not None and output_format(src.path):
        from ..api import load

        return load(src.path), src
    return load_source(src)


def cache_note(spec: str) -> str | None:
    """A line saying which cached model a hub id found under its other name, if it did."""
    from pathlib import Path

    if spec.startswith("demo:") or spec.endswith(".onnx") or Path(spec).expanduser().exists():
        return None
    from ..io.hub_cache import repo_of_snapshot
    from ..io.sources import resolve_source

    src = resolve_source(spec)
    repo = repo_of_snapshot(src.path) if src.kind == "hub" and src.path is not None else None
    if repo is None or repo.lower() == spec.lower():
        return None
    return f"'{spec}' is not in the Hugging Face cache under that id; using the cached '{repo}' (its other name)"


def count_params(model: nn.Module) -> int:
    """Unique parameters of `model` (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())


def parse_layers(text: str | None) -> list[int] | None:
    """'1,3,5' -> [1, 3, 5]."""
    if text is None:
        return None
    from ..errors import OptionError

    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise OptionError(f"--layers takes comma-separated FFN indices like 1,3,5, got {text!r}") from None


def site_moe(plan: UpcyclePlan, site: FFNSite | str) -> MoEConfig | None:
    """The MoE settings of `site` (a site or its module path); None when it stays an FFN."""
    path = site if isinstance(site, str) else site.path
    return plan.layer(path).moe if path in plan.selected and path in plan.layers else None


def plan_moes(plan: UpcyclePlan) -> list[MoEConfig]:
    """The distinct MoE settings of the plan's MoE layers, in site order."""
    out: list[MoEConfig] = []
    for site in plan.selected_sites:
        cfg = site_moe(plan, site)
        if cfg is not None and cfg not in out:
            out.append(cfg)
    return out


def moe_text(moe: dict[str, Any]) -> str:
    """'topk router, top-2' (and what else changes the routing) of a `moe_dict`."""
    text = f"{moe['router']} router, top-{moe['top_k']}"
    if moe["router"] == "topk" and not moe["normalize"]:
        text += ", weights not renormalised"
    if moe["capacity_factor"] is not None:
        text += f", capacity factor {moe['capacity_factor']:g}"
    return text


def moe_dict(cfg: MoEConfig) -> dict[str, Any]:
    """The settings a reader needs, in JSON form."""
    return {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "router": cfg.router, "normalize": cfg.normalize,
            "capacity_factor": cfg.capacity_factor, "preserves_function": cfg.preserves_function}


def site_rows(plan: UpcyclePlan) -> list[dict[str, Any]]:
    """One row per FFN site: what it is now (FFN or MoE), its shape, its MoE settings."""
    rows = []
    for s in plan.sites:
        cfg = site_moe(plan, s)
        rows.append({
            "stack": s.stack, "index": s.index, "module": s.path, "exit_module": s.exit_path,
            "layer": "MoE" if cfg is not None else "FFN", "ffn_form": s.form, "activation": s.activation,
            "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "moe": moe_dict(cfg) if cfg is not None else None,
            "scheme": plan.layer(s).scheme if cfg is not None else None,
            "shared_expert": cfg is not None and plan.layer(s).shared is not None,
            "expert_size": plan.layer(s).expert_size(s) if cfg is not None else None,
        })
    return rows


def _layer_text(row: dict[str, Any]) -> str:
    gated = row["ffn_form"] == "gated"
    if row["moe"] is None:
        return "gated FFN" if gated else "FFN"
    text = f"MoE: {row['moe']['num_experts']} experts, each {'a gated FFN' if gated else 'an FFN'}"
    if row["expert_size"] != row["intermediate_size"]:
        text += f" of {row['expert_size']} neurons"
    if row["shared_expert"]:
        text += ", + a shared expert"
    return text if row["scheme"] in (None, "copy") else f"{text} ({row['scheme']})"


def sites_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The rows of `site_rows` as a rich table."""
    table = Table(title=title, title_justify="left")
    for col in ("stack", "#", "module", "layer", "activation", "hidden x ffn", "routing"):
        table.add_column(col)
    for r in rows:
        routing = moe_text(r["moe"]) if r["moe"] is not None else ""
        table.add_row(r["stack"] or "-", str(r["index"]), r["module"] + (f" (+ {r['exit_module']})" if r["exit_module"] else ""),
                      _layer_text(r), r["activation"], f"{r['hidden_size']} x {r['intermediate_size']}", routing)
    return table


def param_counts(plan: UpcyclePlan, dense: int) -> dict[str, int]:
    """Parameters of the converted model of a dense model with `dense` parameters."""
    total, active = plan.param_counts(dense)
    return {"total": total, "active_per_token": active, "dense": dense}


def params_from_total(plan: UpcyclePlan, total: int) -> dict[str, int]:
    """`param_counts` of a converted model known only by its total."""
    added, _ = plan.param_counts(0)
    return param_counts(plan, total - added)


def counts_text(params: dict[str, int]) -> str:
    """'560K total, 429K active per token (dense: 362K)'."""
    return (f"{format_count(params['total'])} total, {format_count(params['active_per_token'])} active per token "
            f"(dense: {format_count(params['dense'])})")
