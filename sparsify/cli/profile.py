"""`sparsify profile MOE --calibration FILE | --demo-text -o stats.json`: routing statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .main import command
from .options import Force, UpcycledDir
from .output import Output

__all__ = ["profile"]


@command()
def profile(
    o: Output,
    moe: UpcycledDir,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE",
                                      help="Where to write the statistics (JSON, written atomically).")],
    calibration: Annotated[Optional[Path], typer.Option("--calibration", metavar="FILE", show_default="none: this or --demo-text",
                                                        help="A UTF-8 text file to run the model on.")] = None,
    demo_text: Annotated[bool, typer.Option("--demo-text", help="Use a short built-in text instead of --calibration.")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", metavar="N", help="Tokens per sequence.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Sequences per forward pass.")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", metavar="N", help="Stop after this many calibration tokens.")] = 65536,
    force: Force = False,
) -> None:
    """Record how the routers use the experts on calibration text.

    Per MoE layer: the tokens each expert receives and how often each pair of experts is chosen
    for the same token (the input of sparsify partition)."""
    import json

    from ..io.atomic import atomic_file, check_output
    from ..partition.calibration import calibration_batches, load_tokenizer, read_calibration, token_ids
    from ..partition.profile import profile_routing
    from .common import load_any

    text, where = read_calibration(calibration, demo_text)
    check_output(out, force, [moe, calibration], kind="file")
    o.step(f"loading {moe}")
    model, src = load_any(moe)
    o.step("tokenizing the calibration text")
    tokenizer = load_tokenizer(src.path)
    ids = token_ids(text, tokenizer, model.config.vocab_size)
    batches = calibration_batches(model, ids, seq_len, batch_size, max_tokens)
    info = {"source": where, "model": moe, "tokenizer": "model" if tokenizer is not None else "utf-8 bytes"}
    o.step("running the model and counting the routers' choices")
    stats = profile_routing(model, batches, info)
    with atomic_file(out, force=force, sources=[src.path, calibration]) as tmp:
        tmp.write_text(json.dumps(stats.to_dict(), indent=2))
    layers = {path: _layer_summary(s) for path, s in stats.layers.items()}
    o.emit({"command": "profile", "model": moe, "calibration": where, "out": str(out), "layers": layers})
    o.table(_table(layers, f"routing statistics of {moe} on {where}"))
    o.result(f"wrote {out}")


def _layer_summary(s: Any) -> dict[str, Any]:
    share = s.load_share
    e = len(share)
    hi, lo = max(range(e), key=share.__getitem__), min(range(e), key=share.__getitem__)
    pairs = [(s.coactivation[i][j], i, j) for i in range(e) for j in range(i + 1, e)]
    count, i, j = max(pairs) if pairs else (0, 0, 0)
    return {"tokens": s.tokens, "busiest_expert": hi, "busiest_share": share[hi], "idlest_expert": lo,
            "idlest_share": share[lo], "max_over_mean": max(share) * e,
            "most_co_chosen_pair": [i, j] if count else None, "pair_tokens": count}


def _table(layers: dict[str, dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("MoE layer", "tokens", "busiest expert", "idlest expert", "max/mean", "most co-chosen pair"):
        table.add_column(col)
    for path, m in layers.items():
        pair = m["most_co_chosen_pair"]
        table.add_row(path, str(m["tokens"]), f"{m['busiest_expert']} ({m['busiest_share']:.1%})",
                      f"{m['idlest_expert']} ({m['idlest_share']:.1%})", f"{m['max_over_mean']:.2f}",
                      f"{pair[0]}+{pair[1]} ({m['pair_tokens']} tokens)" if pair else "-")
    return table
