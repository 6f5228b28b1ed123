"""Streamed profile (one MoE layer's experts at a time) gives the routing statistics of the model
loaded in memory, and reads its calibration file only as far as --max-tokens needs."""

from __future__ import annotations

import json
import os
import threading

import pytest

import sparsify
from sparsify.cli.main import main
from sparsify.partition.calibration import DEMO_TEXT, calibration_batches, calibration_ids
from sparsify.partition.profile import profile_routing

from .conftest import NATIVE_CASES, case_id


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_streamed_profile_counts_what_the_loaded_model_routes(upcycled, case, tmp_path):
    out = upcycled(*case)
    assert main(["profile", str(out), "--demo-text", "--seq-len", "32", "--batch-size", "4", "-o", str(tmp_path / "s.json"), "-q"]) == 0
    got = json.loads((tmp_path / "s.json").read_text())
    model = sparsify.load(out, backend="reference")
    ids, _ = calibration_ids(None, True, None, model.config.vocab_size, 65536)
    want = profile_routing(model, calibration_batches(model, ids, 32, 4)).to_dict()
    assert got["layers"] == want["layers"] and set(got["layers"]) == set(model.sparsify_plan.selected)
    assert got["calibration"]["sequences"] == want["calibration"]["sequences"] == len(DEMO_TEXT.encode()) // 32
    assert all(sum(layer["expert_tokens"]) > 0 for layer in got["layers"].values())


def _feed(fifo, chunk: bytes, stop: threading.Event, written: list[int]) -> None:
    """Write `chunk` into the FIFO over and over until `stop` (then close it): a calibration
    file with no end, that only a reader that stops early can finish."""
    fd = os.open(fifo, os.O_WRONLY)
    try:
        while not stop.is_set():
            try:
                written[0] += os.write(fd, chunk)
            except BrokenPipeError:  # the reader is done and closed its end
                return
    finally:
        os.close(fd)


@pytest.mark.parametrize("max_tokens", [100, 5000])
def test_max_tokens_stops_reading_an_endless_calibration_file(upcycled, tmp_path, max_tokens):
    out = upcycled("t5", "native", "copy")
    fifo = tmp_path / "calibration.txt"
    os.mkfifo(fifo)
    stop, written = threading.Event(), [0]
    feeder = threading.Thread(target=_feed, args=(fifo, b"endless calibration text " * 400, stop, written), daemon=True)
    feeder.start()
    timer = threading.Timer(120, stop.set)  # a reader that never stops would hang: end the feed then
    timer.start()
    try:
        code = main(["profile", str(out), "--calibration", str(fifo), "--max-tokens", str(max_tokens), "--seq-len", "50",
                     "-o", str(tmp_path / "s.json"), "-q"])
    finally:
        ended = stop.is_set()
        timer.cancel()
        stop.set()
        feeder.join(10)
    assert code == 0 and not ended, "profile read the calibration FIFO to its end"
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["calibration"]["sequences"] == max_tokens // 50
    # what was read: the tokens needed and a bounded read-ahead (a pipe's buffer and one read)
    assert written[0] <= max_tokens + 64 + (1 << 16) * 3 + 10_000


def test_max_tokens_gives_the_statistics_of_the_file_cut_there(upcycled, tmp_path):
    out = upcycled("gpt2", "native", "copy")
    words = " ".join(f"word{i % 97}" for i in range(50_000)).encode()
    (tmp_path / "long.txt").write_bytes(words + b"\xff\xfe" * 1000)  # a tail that is never tokenized
    (tmp_path / "cut.txt").write_bytes(words[:4000])
    for name in ("long", "cut"):
        assert main(["profile", str(out), "--calibration", str(tmp_path / f"{name}.txt"), "--max-tokens", "3000",
                     "--seq-len", "64", "-o", str(tmp_path / f"{name}.json"), "-q"]) == 0
    long, cut = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("long", "cut"))
    assert long["layers"] == cut["layers"] and long["calibration"]["sequences"] == 3000 // 64


@pytest.mark.parametrize("case", [("t5", "switch", "copy"), ("mistral", "mixtral", "copy"), ("qwen3", "qwen2-moe", "copy")],
                         ids=case_id)
def test_profile_of_a_hugging_face_format_is_refused_in_one_line(upcycled, case, tmp_path, sparsify_cli):
    code, _, err = sparsify_cli("profile", upcycled(*case), "--demo-text", "-o", tmp_path / "s.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"in the {case[1]} format" in lines[0] and "--format native" in lines[0]
    assert not (tmp_path / "s.json").exists()
