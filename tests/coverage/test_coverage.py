"""The coverage sweep's fast slice, and the consistency of what the sweep records.

CI runs a few representative families through the whole sweep (build tiny, save, upcycle twice
through the CLI, load and compare, export to ONNX and run it); `python -m tests.coverage.sweep`
runs every family (see README.md, "Coverage"). The recorded results, the expected-pass list and
the README's table must agree with each other and with the installed registry."""

from __future__ import annotations

import pytest
import transformers

from tests.coverage.check import check_family, classify
from tests.coverage.ffn_like import has_ffn_like_chain
from tests.coverage.registry import families
from tests.coverage.report import BEGIN, DETAILS, END, README, render, render_details
from tests.coverage.sweep import RESULTS, expected_pass, load_results, regressions
from tests.coverage.tiny import tiny_config

# a decoder-only LM, an encoder-decoder (two ONNX graphs), a speech encoder (raw audio inputs)
FAST = ["llama", "t5", "wav2vec2"]

_recorded = load_results()
_same_transformers = RESULTS.is_file() and f'"transformers": "{transformers.__version__}"' in RESULTS.read_text()


@pytest.mark.parametrize("model_type", FAST)
def test_fast_slice_passes(model_type, tmp_path):
    assert model_type in expected_pass()
    result = check_family(model_type, tmp_path)
    assert result.result == "pass", f"{result.stage}: {result.reason}"
    assert set(result.max_rel) == {"top2-every2", "top1-every1", "onnx"}


@pytest.mark.parametrize("model_type,kind", [("clip", "composite"), ("mixtral", "moe"), ("doge", None), ("bert", None)])
def test_classification_from_the_config(model_type, kind):
    result = classify(model_type)
    assert (result.kind if result else None) == kind
    if result:
        assert result.result == "skip" and result.reason


def test_a_registry_entry_naming_no_class_is_not_a_dense_failure():
    # transformers 5.24's MODEL_MAPPING_NAMES names VoxtralRealtimeTextModel, which it never defines
    import transformers

    from tests.coverage.registry import families

    broken = [f for f in families() if getattr(transformers, f.class_name, None) is None]
    for f in broken:
        result = classify(f.model_type)
        assert result is not None and result.stage == "missing" and f.class_name in result.reason


@pytest.mark.parametrize("model_type,expected", [("mamba", False), ("resnet", False), ("bert", True), ("whisper", True),
                                                 ("bitnet", True), ("levit", True)])
def test_ffn_like_chains(model_type, expected):
    """Mamba's gate multiplies a state-space scan, not a projection; ResNet's 1x1 convolutions are
    separated by 3x3 ones; BitNet's FFN normalises between its projections."""
    from sparsify.capture import capture
    from sparsify.io.skeleton import build_skeleton
    from tests.coverage.registry import family

    config = tiny_config(model_type, [family(model_type).class_name])
    assert has_ffn_like_chain(capture(build_skeleton(config))) is expected


@pytest.mark.parametrize("model_type", ["llama", "t5", "vit", "swin", "wav2vec2", "whisper"])
def test_tiny_configs_are_tiny(model_type):
    from tests.coverage.registry import family

    config = tiny_config(model_type, [family(model_type).class_name])
    model = getattr(transformers, family(model_type).class_name)(config)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    vocab = getattr(config, "vocab_size", None)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        assert not isinstance(value, int) or vocab is None or value < vocab


@pytest.mark.skipif(not _same_transformers, reason="results.json was recorded with another transformers")
def test_results_cover_the_whole_registry():
    assert {f.model_type for f in families()} <= set(_recorded)


@pytest.mark.skipif(not _same_transformers, reason="results.json was recorded with another transformers")
def test_expected_families_passed_when_recorded():
    assert not regressions(_recorded, expected_pass())
    assert set(expected_pass()) <= {f.model_type for f in families()}


def test_readme_and_details_are_the_recorded_results():
    from tests.coverage.report import _versions

    text = README.read_text()
    section = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert section == render(_recorded, _versions(RESULTS))
    assert DETAILS.read_text() == render_details(_recorded, _versions(RESULTS))


def _record_many(path: str, worker: int, count: int, start) -> None:
    from pathlib import Path

    from tests.coverage.check import Result
    from tests.coverage.sweep import record_results

    start.wait()  # all at once
    for i in range(count):
        r = Result(f"w{worker}-{i}", result="pass")
        record_results(lambda recorded: {**recorded, r.model_type: r}, Path(path))


def test_sweeps_recording_at_once_keep_every_record(tmp_path):
    """Two `--record` sweeps at once: each writes as its families end, and neither drops what
    the other wrote (real processes on a real file)."""
    import multiprocessing

    path = tmp_path / "results.json"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_record_many, args=(str(path), w, 100, start)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert set(load_results(path)) == {f"w{w}-{i}" for w in range(3) for i in range(100)}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
