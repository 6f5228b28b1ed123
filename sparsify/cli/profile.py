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
    for the same token (the input of sparsify partition). The model runs with its dense parts in
    memory and one MoE layer's experts at a time, read for each batch; reading stops at
    --max-tokens."""
    import json

    from ..errors import SourceError
    from ..formats.registry import output_format
    from ..io.atomic import atomic_file, check_output
    from ..io.sources import resolve_source
    from ..partition.calibration import calibration_batches, calibration_ids, load_tokenizer
    from ..partition.profile import profile_routing
    from ..streaming.output import load_streamed

    if (calibration is None) == (not demo_text):
        from ..errors import OptionError

        raise OptionError("give either --calibration FILE or --demo-text (exactly one)")
    check_output(out, force, [moe, calibration], kind="file")
    src = resolve_source(moe)
    if src.path is None or not output_format(src.path):
        raise SourceError(f"'{moe}' has no MoE layer: it is not an upcycled model directory; make one with sparsify upcycle")
    o.step(f"loading {moe}")
    model = load_streamed(src.path)  # the dense parts; each MoE layer reads its experts when it runs
    o.step("tokenizing the calibration text")
    tokenizer = load_tokenizer(src.path)
    ids, where = calibration_ids(calibration, demo_text, tokenizer, model.config.vocab_size, max_tokens)
    batches = calibration_batches(model, ids, seq_len, batch_size, max_tokens)
    info = {"source": where, "model": moe, "tokenizer": "model" if tokenizer is not None else "utf-8 bytes"}
    o.step("running the model and counting the routers' choices, one MoE layer's experts at a time")
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
