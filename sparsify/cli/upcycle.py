"""`sparsify upcycle SOURCE --experts N -o OUT`: checkpoints and ONNX graphs, and `--dry-run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..units import format_bytes
from .common import cache_note, counts_text, moe_dict, moe_text, param_counts, parse_layers, plan_moes, site_rows, sites_table
from .main import command
from .options import DTYPE_CHOICES, FORMAT_CHOICES, ONNX_TARGETS, ROUTER_CHOICES, SOURCE_HELP, Force, argument, choices
from .output import Output

__all__ = ["upcycle", "summary_lines"]

_STAGES = {"load": "loading {source}", "plan": "capturing the graph, finding FFNs, planning", "write": "writing {out}"}

# The flags that are recipe keys (the parameter name is the key).
_RECIPE_FLAGS = ("experts", "top_k", "router", "normalize", "every", "layers", "capacity_factor", "noise", "seed",
                 "drop_ratio", "granularity", "shared_fraction", "split", "experts_from", "merge_base", "router_init",
                 "prompts", "calibration")


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the flag `name` was given (on the command line or by its environment variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@command()
def upcycle(
    o: Output,
    ctx: typer.Context,
    source: Annotated[str, argument("SOURCE", SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT",
                                      help="Output directory (an .onnx file for an ONNX source), written atomically.")],
    experts: Annotated[Optional[int], typer.Option("--experts", "-e", metavar="N", show_default="the recipe's",
                                                   help="Experts per MoE layer (2 or more); required without --recipe.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", metavar="K", help="Experts per token.",
                                                 show_default="2; 1 with --router switch")] = None,
    router: Annotated[Optional[str], typer.Option(
        "--router", metavar=choices(ROUTER_CHOICES), show_default="topk; switch with --format switch",
        help="How tokens choose experts; expert-choice only on encoder (non-causal) layers.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                                            help="Renormalise the top-k routing weights to sum to 1.")] = True,
    every: Annotated[Optional[int], typer.Option(
        "--every", metavar="N", show_default="2; 1 with --format mixtral",
        help="Within each stack, FFN j becomes an MoE layer when j % N == N - 1.")] = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", metavar="LIST", show_default="chosen by --every", help="Comma-separated FFN indices within each stack, e.g. 1,3,5 (instead of --every).")] = None,
    capacity_factor: Annotated[Optional[float], typer.Option(
        "--capacity-factor", metavar="F", show_default="none: dropless",
        help="Expert capacity factor; tokens over an expert's capacity are dropped.")] = None,
    noise: Annotated[float, typer.Option("--noise", metavar="STD",
                                         help="Std of Gaussian noise added to each expert copy (breaks exact preservation).")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the router init and the expert noise.")] = 0,
    drop_ratio: Annotated[float, typer.Option(
        "--drop-ratio", metavar="R",
        help="Drop-Upcycling: re-initialise this share of each expert's neurons from the weights' mean and std.")] = 0.0,
    granularity: Annotated[int, typer.Option(
        "--granularity", metavar="G",
        help="Granular upcycling: each FFN split into G shards, one per expert of a router group; "
             "--experts and --top-k multiples of G.")] = 1,
    shared_fraction: Annotated[float, typer.Option(
        "--shared-fraction", metavar="F",
        help="This share of each FFN's neurons in one always-on shared expert; the routed experts copy the rest.")] = 0.0,
    split: Annotated[bool, typer.Option(
        "--split", help="Parameter-neutral: each expert holds 1/E of the FFN's neurons (fewer active parameters; "
                        "not function-preserving).")] = False,
    experts_from: Annotated[Optional[str], typer.Option(
        "--experts-from", metavar="A,B,...", show_default="none: every expert a copy of SOURCE's FFN",
        help="Comma-separated checkpoints (fine-tunes of SOURCE), one per expert in this order: each expert's FFNs "
             "are read from its own; --experts then defaults to their count.")] = None,
    merge_base: Annotated[str, typer.Option(
        "--merge-base", metavar="base|average",
        help="With --experts-from, where the other weights come from: base (SOURCE) or average (over SOURCE and the "
             "sources, as Branch-Train-MiX does).")] = "base",
    router_init: Annotated[str, typer.Option(
        "--router-init", metavar="random|prompts|embeddings|kmeans",
        help="Router rows: random, from the hidden states of --prompts, from the token embeddings of --prompts, "
             "or k-means centroids of the hidden states of --calibration text.")] = "random",
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", metavar="FILE", show_default="none",
        help="YAML or JSON: for each expert a list of positive prompts and optionally negative ones.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", metavar="FILE", show_default="none",
        help="Text file whose hidden states --router-init kmeans clusters.")] = None,
    format: Annotated[str, typer.Option("--format", "-f", metavar=choices(FORMAT_CHOICES),
                                        help="Output format; auto writes a Hugging Face format where one fits.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar=choices(DTYPE_CHOICES), show_default="the source's",
                                                 help="Dtype of the output's weights.")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", metavar="SIZE",
                                            help="Largest output shard, e.g. 5GB or 500MiB.")] = "5GB",
    target: Annotated[str, typer.Option("--target", metavar=choices(ONNX_TARGETS),
                                        help="ONNX sources only: ort fuses into com.microsoft.MoE, standard keeps standard ops.")] = "ort",
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Convert source weights that hold NaN or Inf as they are (refused by default, by name).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Plan, choose the format and size the output (sites, selection, parameters, bytes), write nothing.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(
        "--recipe", metavar="FILE", show_default="none",
        help="A recipe file (YAML): MoE options per stack and per layer; flags given beside it replace its top-level keys.")] = None,
    force: Force = False,
) -> None:
    """Convert a dense model into an MoE model.

    Each selected FFN becomes a router and N experts that start as copies of it, so the outputs
    stay those of the dense model (with the default routing). Checkpoints are converted by
    streaming, one tensor at a time, in bounded memory; ONNX graphs (SOURCE ending in .onnx) are
    upcycled into an ONNX graph. Every option flag is a key of one recipe (--recipe FILE for
    settings per stack and per layer)."""
    from ..errors import OptionError

    if recipe is None and experts is None and experts_from is None:  # before the imports below (torch)
        raise OptionError("give the expert count (--experts N), the experts' checkpoints (--experts-from A,B,...) "
                          "or a recipe (--recipe FILE)")
    from ..model_recipe import Recipe

    # Every path goes through one recipe: the file's, with the flags given on the command line
    # (not their defaults) replacing its top-level keys.
    given = {name: ctx.params[name] for name in _RECIPE_FLAGS if _given(ctx, name)}
    if "layers" in given:
        given["layers"] = parse_layers(given["layers"])
    given.update({k: str(given[k]) for k in ("prompts", "calibration") if k in given})
    moe_recipe = Recipe.build(Recipe.load(recipe) if recipe is not None else None, flags=True, **given)
    if source.endswith(".onnx"):  # ONNX-native upcycling: ONNX in, ONNX out (sparsify.onnx)
        if any(k in given for k in ("experts_from", "merge_base", "router_init", "prompts", "calibration")):
            raise OptionError("--experts-from, --merge-base, --router-init, --prompts and --calibration take Hugging Face "
                              "checkpoints, not ONNX graphs")
        doc = _upcycle_onnx(o, source, out, moe_recipe, force, target, dry_run)
    else:
        doc = _upcycle_checkpoint(o, source, out, recipe=moe_recipe, format=format, dtype=dtype, shard_size=shard_size,
                                  force=force, dry_run=dry_run, allow_nonfinite=allow_nonfinite)
    o.emit(doc)
    verb = "dry run (nothing written):" if dry_run else "upcycled"
    o.result(f"{verb} {source} -> {doc['out']}")
    if dry_run:
        o.table(sites_table(doc["sites"], f"{source}: the plan"))
    for line in summary_lines(doc):
        o.detail(f"  {line}")
    if doc["format_reason"]:
        o.explain(f"  format choice: {doc['format_reason']}")


def _upcycle_checkpoint(o: Output, source: str, out: Path, format: str, dry_run: bool, **options: Any) -> dict[str, Any]:
    from ..convert import convert

    def progress(stage: str, done: int, total: int) -> None:
        text = _STAGES.get(stage, stage).format(source=source, out=out)
        o.advance(text, done, total if stage == "write" else None)

    o.step(_STAGES["load"].format(source=source))
    note = cache_note(source)
    if note:
        o.detail(note)
    r = convert(source, out, format=format, progress=progress, dry_run=dry_run, **options)
    name = "native" if r.format == "sparsify-native" else r.format
    if format != "auto":
        short = f"{name} (requested)"
    elif name == "native":
        short = "native (no Hugging Face format fits this source and these options; --verbose says why)"
    else:
        short = f"{name} (a Hugging Face format that fits this source and keeps the options' meaning)"
    total, active = r.params
    written = None if dry_run else sum(f.stat().st_size for f in Path(r.out).rglob("*") if f.is_file())
    doc = _doc(source, r.out, r.plan, {"total": total, "active_per_token": active, "dense": r.dense_params},
               name, short, r.format_reason, r.bytes_written, written, r.streamed, r.why_not_preserving, dry_run,
               options.get("dtype"))
    doc["notes"] = r.notes
    return doc


def _upcycle_onnx(o: Output, source: str, out: Path, recipe: Any, force: bool, target: str, dry_run: bool) -> dict[str, Any]:
    from ..onnx.upcycle import upcycle_onnx

    o.step(f"upcycling the ONNX graph {source}")
    r = upcycle_onnx(source, out, recipe=recipe, target=target, force=force, dry_run=dry_run)
    why = r.plan.why_not_preserving()
    params = param_counts(r.plan, r.dense_params)
    params["total"] = r.total_params
    written = None if dry_run else sum(p.stat().st_size for p in _onnx_files(r.path))
    doc = _doc(source, r.path, r.plan, params, "onnx", f"onnx, target {target}", "", r.weight_bytes, written, False,
               why, dry_run)
    doc["fusion"] = r.report.to_dict()
    doc["fusion_lines"] = r.report.lines()
    return doc


def _onnx_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _doc(source: str, out: Path, plan: Any, params: dict[str, int], fmt: str, format_line: str, format_reason: str,
         weight_bytes: int, written: int | None, streamed: bool, why: str | None, dry_run: bool,
         dtype: str | None = None) -> dict[str, Any]:
    from ..verify import rtol_for

    cfgs = plan_moes(plan)
    return {
        "command": "upcycle", "source": source, "out": str(out), "dry_run": dry_run,
        "sites": site_rows(plan), "rejected": [{"path": r.path, "reason": r.reason} for r in plan.rejected],
        "selected": list(plan.selected), "moe": moe_dict(cfgs[0]) if len(cfgs) == 1 else None,
        "parameters": params, "format": fmt, "format_line": format_line, "format_reason": format_reason,
        "weight_bytes": weight_bytes, "bytes_written": written, "streamed": streamed, "preserves_outputs": why is None, "why_not_preserving": why,
        # what "preserves" means: within this share of the largest dense output (sparsify verify's default)
        "dtype": dtype, "rtol": rtol_for(dtype), "notes": [],
    }


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The text summary of an upcycle document (the same figures as its JSON)."""
    sites, selected = doc["sites"], doc["selected"]
    rejected = len(doc["rejected"])
    moe = doc["moe"]
    verb = "would convert" if doc["dry_run"] else "converted"
    if moe is not None:
        how = f"MoE layers of {moe['num_experts']} experts each ({moe_text(moe)})"
    else:
        how = "MoE layers with per-layer settings (sparsify inspect lists them)"
    lines = [
        f"FFN sites found: {len(sites)} ({rejected} candidate{'s' if rejected != 1 else ''} rejected)",
        f"{verb} {len(selected)} of the {len(sites)} FFNs into {how}",
        f"parameters: {counts_text(doc['parameters'])}",
    ]
    how = " by streaming" if doc["streamed"] else ""
    if doc["dry_run"]:
        size = f"{format_bytes(doc['weight_bytes'])} of weights would be written{how}"
    else:
        size = f"{format_bytes(doc['bytes_written'])} written{how}"
    lines.append(f"format: {doc['format_line']}; {size}")
    lines.extend(doc.get("fusion_lines", []))
    dense = "dense graph's" if doc["format"] == "onnx" else "dense model's"
    lines.extend(doc.get("notes", []))
    if doc["why_not_preserving"]:
        lines.append(f"outputs differ from the {dense} at initialisation: {doc['why_not_preserving']}")
    elif doc.get("dtype") not in (None, "float32"):
        lines.append(f"outputs equal the {dense} at initialisation up to rounding the weights to {doc['dtype']}: "
                     f"not checked here; sparsify verify checks them within {doc['rtol']:g} x the largest dense output")
    else:
        lines.append(f"outputs equal the {dense} at initialisation by construction: not checked here; "
                     f"sparsify verify checks them within {doc.get('rtol', 1e-5):g} x the largest dense output")
    return lines

