"""`sparsify profile MOE --calibration FILE | --demo-text -o stats.json`: routing statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..io.atomic import atomic_file, check_output
from ..partition.calibration import calibration_batches, load_tokenizer, read_calibration, token_ids
from ..partition.profile import profile_routing
from ..partition.stats import RoutingStats
from .common import load_any
from .main import app, console


@app.command()
def profile(
    moe: str = typer.Argument(..., help="An upcycled model directory (written by sparsify upcycle)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the statistics (JSON, written atomically)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A UTF-8 text file to run the model on."),
    demo_text: bool = typer.Option(False, "--demo-text", help="Use a short built-in text instead of --calibration."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Stop after this many calibration tokens."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Run the model over calibration text; record per MoE layer the tokens each expert gets and
    how often each pair of experts is chosen for the same token."""
    text, where = read_calibration(calibration, demo_text)
    check_output(out, force, [moe, calibration], kind="file")
    model, src = load_any(moe)
    tokenizer = load_tokenizer(src.path)
    ids = token_ids(text, tokenizer, model.config.vocab_size)
    batches = calibration_batches(model, ids, seq_len, batch_size, max_tokens)
    info = {"source": where, "model": moe, "tokenizer": "model" if tokenizer is not None else "utf-8 bytes"}
    stats = profile_routing(model, batches, info)
    with atomic_file(out, force=force, sources=[src.path, calibration]) as tmp:
        tmp.write_text(json.dumps(stats.to_dict(), indent=2))
    console.print(_table(stats, f"routing statistics of {moe} on {where}"))
    console.print(f"[bold green]wrote[/] {out}")


def _table(stats: RoutingStats, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("MoE layer", "tokens", "busiest expert", "idlest expert", "max/mean", "most co-chosen pair"):
        table.add_column(col)
    for path, s in stats.layers.items():
        share = s.load_share
        e = len(share)
        hi, lo = max(range(e), key=share.__getitem__), min(range(e), key=share.__getitem__)
        pairs = [(s.coactivation[i][j], i, j) for i in range(e) for j in range(i + 1, e)]
        count, i, j = max(pairs) if pairs else (0, 0, 0)
        table.add_row(path, str(s.tokens), f"{hi} ({share[hi]:.1%})", f"{lo} ({share[lo]:.1%})",
                      f"{max(share) * e:.2f}", f"{i}+{j} ({count} tokens)" if count else "-")
    return table
