"""Calibration text for routing statistics: read it, tokenize it, cut it into model inputs.

A model directory with tokenizer files is tokenized with its own tokenizer. Without one (the
demo models have none) the text's UTF-8 bytes are the token ids (modulo the vocabulary), which
keeps the statistics reproducible though not linguistically meaningful.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import OptionError, SourceError

__all__ = ["DEMO_TEXT", "calibration_ids", "load_tokenizer", "token_ids", "calibration_batches"]

DEMO_TEXT = """\
Mixture-of-Experts models replace a dense feed-forward block with many experts and a router
that sends each token to a few of them. Sparse upcycling starts such a model from a dense
checkpoint: every expert begins as a copy of the dense block, and the router learns which
expert suits which token. Expert parallelism spreads the experts over many devices; tokens
travel to their experts with an all-to-all exchange and travel back with another.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be, or not to be, that is the question. It was the best of times, it was the
worst of times. In the beginning was the word. Call me Ishmael. All happy families are alike.
Numbers: 3.14159 2.71828 1.41421 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584.
Code: def add(a, b): return a + b; for i in range(10): print(i * i); x = [k for k in d if k].
Balancing the load across experts matters: a rank whose experts receive most of the tokens
holds every other rank back, because each layer waits for the slowest rank's all-to-all.
"""


_MARGIN = 64  # tokens read past the limit, so that the cut does not change the last ones kept
_READ = 1 << 16


def calibration_ids(path: str | Path | None, demo_text: bool, tokenizer: Any | None, vocab_size: int,
                    max_tokens: int) -> tuple[list[int], str]:
    """The first `max_tokens` token ids of the calibration text (`path`, or the demo text) and a
    description of where it came from. A file is read only as far as those tokens need: a
    prefix, cut after whitespace, is tokenized once it may hold them, and read further if not."""
    if (path is None) == (not demo_text):
        raise OptionError("give either --calibration FILE or --demo-text (exactly one)")
    if max_tokens < 1:
        raise OptionError("--seq-len, --batch-size and --max-tokens must be positive")
    if path is None:
        return token_ids(DEMO_TEXT, tokenizer, vocab_size)[:max_tokens], "demo-text"
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise SourceError(f"no such calibration file: '{path}'") from None
    except IsADirectoryError:
        raise SourceError(f"'{path}' is a directory; --calibration takes a text file") from None
    need, guess = max_tokens + _MARGIN, max_tokens + _MARGIN  # characters: a token has one or more
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, ids = "", []
    with raw:
        while True:
            data = raw.read1(_READ)  # what is there, without waiting for more (pipes too)
            end = not data
            text += decoder.decode(data, final=end)
            if not end and len(text) < guess:
                continue
            cut = len(text) if end else max(text.rfind(" "), text.rfind("\n")) + 1
            ids = token_ids(text[:cut], tokenizer, vocab_size) if cut else []
            if end or len(ids) >= need:
                break
            guess = int(len(text) * need / max(1, len(ids)) * 1.1) + 1
    if not text.strip():
        raise SourceError(f"calibration file '{path}' is empty")
    return ids[:max_tokens], str(path)


def load_tokenizer(model_dir: Path | None) -> Any | None:
    """The tokenizer saved in `model_dir`, or None when it has no tokenizer files."""
    if model_dir is None or not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # a broken tokenizer should not stop profiling; bytes still work
        raise SourceError(f"cannot load the tokenizer of '{model_dir}': {str(err).splitlines()[0][:200]}") from None


def token_ids(text: str, tokenizer: Any | None, vocab_size: int) -> list[int]:
    """Token ids of `text`: the tokenizer's, else UTF-8 bytes modulo `vocab_size`."""
    if tokenizer is not None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [b % vocab_size for b in text.encode("utf-8")]


def calibration_batches(
    model: nn.Module, ids: list[int], seq_len: int = 128, batch_size: int = 8, max_tokens: int = 65536
) -> Iterator[dict[str, Any]]:
    """Keyword inputs for `model`: the first `max_tokens` of `ids` cut into full rows of
    `seq_len` (shortened to the text or the model's positions), `batch_size` rows a batch."""
    if seq_len < 1 or batch_size < 1 or max_tokens < 1:
        raise OptionError("--seq-len, --batch-size and --max-tokens must be positive")
    ids = ids[:max_tokens]
    if not ids:
        raise SourceError("the calibration text has no tokens")
    seq_len = min(seq_len, len(ids), _max_positions(model) or seq_len)
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    config = getattr(model, "config", None)
    device = next(iter(model.parameters())).device
    for start in range(0, len(rows), batch_size):
        batch = torch.tensor(rows[start : start + batch_size], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"input_ids": batch}
        if getattr(config, "is_encoder_decoder", False):
            # Routing statistics need the decoder's MoE layers to run too; the text itself is
            # a reasonable decoder input for that purpose.
            kwargs["decoder_input_ids"] = batch
        if hasattr(config, "use_cache"):
            kwargs["use_cache"] = False
        yield kwargs


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None
