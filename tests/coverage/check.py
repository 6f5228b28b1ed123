"""One family through the sweep, as a new user would take it.

    classify (composite / MoE from the config) -> build tiny (seeded random weights) -> run it
    -> save_pretrained -> `sparsify upcycle DIR --experts 4 -o OUT` and
       `--experts 4 --top-k 1 --every 1`, each `sparsify.load`ed and compared with the dense
       model on the same inputs (max |diff| <= 1e-5 x max |dense output|)
    -> `sparsify export OUT --onnx -o X.onnx`, run in ONNX Runtime at another batch size (and
       sequence length, for token inputs) and compared with the upcycled torch model (1e-4); for
       a model whose forward fixes its input sizes, which the export refuses to make dynamic
       (saying to export static shapes), `--static` at that other size, as its error says

The CLI runs in this process (`sparsify.cli.main.main`), exactly as the console script runs it.
Every failure becomes one line (the stage and the reason), never a traceback. A family whose
upcycle finds no FFN is classified "no-ffn" when its graph has nothing shaped like one
(`ffn_like.has_ffn_like_chain`); otherwise it is a dense family that fails, with sparsify's reason.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.coverage.registry import composite_reason, family, moe_reason
from tests.coverage.tiny import tiny_config

__all__ = ["Result", "check_family", "classify", "run_onnx", "ROUTINGS", "RTOL_LOAD", "RTOL_ONNX", "KINDS"]

ROUTINGS = {
    "top2-every2": ["--experts", "4"],
    "top1-every1": ["--experts", "4", "--top-k", "1", "--every", "1"],
}
RTOL_LOAD = 1e-5
# ONNX Runtime sums in another order than torch; the export tests use the same bound
RTOL_ONNX = 1e-4
KINDS = ("dense", "no-ffn", "moe", "composite")
_NO_FFN = ("no FFN found", "no convertible FFN found")


@dataclass
class Result:
    """What the sweep found for one family."""

    model_type: str
    class_name: str = ""
    task: str = ""
    kind: str = "dense"  # one of KINDS
    result: str = "fail"  # pass | fail | skip (not swept: its kind is not dense)
    stage: str = ""  # the step that failed, or the kind's reason for a skip
    reason: str = ""
    max_rel: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        """The inverse of `to_dict`."""
        return cls(**d)


class _Stop(Exception):
    def __init__(self, stage: str, reason: str, kind: str = "dense", result: str = "fail"):
        super().__init__(reason)
        self.stage, self.reason, self.kind, self.result = stage, reason, kind, result


def _line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    # huggingface_hub's strict dataclasses name the validator on the first line, the reason after it
    first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {first}"[:300] if first else type(err).__name__


@contextlib.contextmanager
def _stage(stage: str):
    try:
        yield
    except _Stop:
        raise
    except Exception as err:
        raise _Stop(stage, _line(err)) from None


def _cli(*args: str) -> str | None:
    """Run the sparsify CLI in this process; None on success, else its one-line error."""
    from sparsify.cli.main import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in args])
    except Exception as exc:  # the CLI let an exception through: a bug of sparsify's, named as such
        return f"uncaught {_line(exc)}"
    if code == 0:
        return None
    lines = [ln.strip() for ln in err.getvalue().splitlines() if ln.strip()]
    return (lines[-1].removeprefix("error: ") if lines else f"exit code {code}")[:400]


def classify(model_type: str) -> Result | None:
    """The result of a family that is not swept (missing, composite, already MoE), from its
    config alone; None for a family to sweep."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        fam = family(model_type)
    except KeyError:
        return Result(model_type, result="skip", stage="missing", reason="not in the installed transformers' registry")
    skip = Result(fam.model_type, fam.class_name, fam.task, result="skip")
    import transformers

    if getattr(transformers, fam.class_name, None) is None:
        # the registry's own entry is broken (voxtral_realtime_text names a class never defined):
        # no user can build this family, with sparsify or without
        skip.stage = "missing"
        skip.reason = f"the installed transformers' registry names {fam.class_name}, a class it does not define"
        return skip
    config_class = CONFIG_MAPPING[model_type]
    why = composite_reason(config_class)
    if why:
        skip.kind, skip.stage, skip.reason = "composite", "composite", why
        return skip
    try:
        why = moe_reason(config_class())
    except Exception:  # a config without defaults: the sweep reports it
        why = None
    if why:
        skip.kind, skip.stage, skip.reason = "moe", "moe", why
        return skip
    return None


def _build(model_type: str, class_name: str):
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise _Stop("build", f"transformers has no class {class_name}")
    with _stage("config"):
        config = tiny_config(model_type, [class_name])
    with _stage("build"):
        torch.manual_seed(0)
        model = cls(config).eval()
    return model


def _first(model, inputs: dict) -> torch.Tensor:
    """The model's main output on `inputs`, under a fixed seed, as sparsify.verify compares
    (a forward that samples, as ViLT's patch selection, draws the same numbers each time)."""
    from sparsify.verify import seeded_output

    return seeded_output(model, inputs).detach().float()


@torch.no_grad()
def run_onnx(paths: dict[str, Path], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The first output of the exported graph(s) at `paths` ({role: file}) on `inputs`, each graph
    fed by its inputs' names; an encoder's output feeds the decoder as encoder_hidden_states."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1

    def run(path: Path, extra: dict[str, np.ndarray]) -> np.ndarray:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            if i.name in extra:
                feeds[i.name] = extra[i.name]
            elif i.name in inputs:
                feeds[i.name] = inputs[i.name].numpy()
            else:
                raise _Stop("onnxruntime", f"graph {path.name} has input '{i.name}' that no example input names")
        return sess.run(None, feeds)[0]

    if "model" in paths:
        return run(paths["model"], {})
    hidden = run(paths["encoder"], {})
    mask = inputs.get("attention_mask")
    extra = {"encoder_hidden_states": hidden, **({"encoder_attention_mask": mask.numpy()} if mask is not None else {})}
    return run(paths["decoder"], extra)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    scale = float(ref.abs().max())
    return float((got - ref).abs().max()) / scale if scale else float((got - ref).abs().max() > 0)


_NO_FFN_REASON = "no FFN: no projection feeds another through an activation in its graph"


def _has_ffn_like(model) -> bool:
    """True when the built model's graph has something shaped like an FFN (see ffn_like); a
    model that cannot be captured counts as having one (it is then a failure, not a skip)."""
    from sparsify.capture import capture
    from tests.coverage.ffn_like import has_ffn_like_chain

    try:
        return has_ffn_like_chain(capture(model))
    except Exception:
        return True


def _no_ffn(dense_dir: Path) -> bool:
    """True when the saved family's graph has nothing shaped like an FFN (see ffn_like)."""
    import transformers

    from sparsify.capture import capture
    from sparsify.io.skeleton import build_skeleton, model_class
    from tests.coverage.ffn_like import has_ffn_like_chain

    config = transformers.AutoConfig.from_pretrained(dense_dir)
    return not has_ffn_like_chain(capture(build_skeleton(config, model_class(config))))


@torch.no_grad()
def _sweep(result: Result, workdir: Path) -> None:
    import sparsify
    from sparsify.inputs import example_inputs_for
    from sparsify.onnx.signatures import graph_paths

    model = _build(result.model_type, result.class_name)
    with _stage("run"):
        inputs = example_inputs_for(model, batch=2, seq=16, seed=0)
        dense_out = _first(model, inputs)
    if not torch.isfinite(dense_out).all() or not float(dense_out.abs().max()):
        # a comparison with zeros or NaNs would pass or fail for no reason; a family with no FFN
        # is that whatever it outputs (WavTokenizer's encoder returns only integer codes)
        if not _has_ffn_like(model):
            raise _Stop("no-ffn", _NO_FFN_REASON, kind="no-ffn", result="skip")
        raise _Stop("run", "the tiny model's output is all zeros or not finite; fix its config in tiny.py")
    dense = workdir / "dense"
    with _stage("save"):
        model.save_pretrained(dense)
    outs = {}
    for name, options in ROUTINGS.items():
        out = workdir / name
        error = _cli("upcycle", dense, *options, "-o", out)
        if error is not None:
            if error.startswith(_NO_FFN) and _no_ffn(dense):
                raise _Stop("no-ffn", _NO_FFN_REASON, kind="no-ffn", result="skip")
            raise _Stop(f"upcycle {name}", error)
        with _stage(f"load {name}"):
            moe = sparsify.load(out)
        with _stage(f"compare {name}"):
            rel = _rel(_first(moe, inputs), dense_out)
        result.max_rel[name] = rel
        if not rel <= RTOL_LOAD:
            raise _Stop(f"compare {name}", f"sparsify.load output differs from the dense model by {rel:.2e} "
                                           f"of its largest magnitude (bound {RTOL_LOAD:g})")
        outs[name] = moe
    onnx_path = workdir / "model.onnx"
    first = next(iter(ROUTINGS))
    error = _cli("export", workdir / first, "--onnx", "-o", onnx_path)
    static = error is not None and "export with static shapes (--static" in error
    if static:  # as the error says, as a user would: a graph at fixed shapes, checked at those shapes
        error = _cli("export", workdir / first, "--onnx", "--static", "--batch", "3", "--seq", "11", "-o", onnx_path)
    if error is not None:
        raise _Stop("export" + (" --static" if static else ""), error)
    moe = outs[first]
    with _stage("onnxruntime"):
        other = example_inputs_for(moe, batch=3, seq=11, seed=1)
        ref = _first(moe, other)
        got = torch.from_numpy(np.asarray(run_onnx(graph_paths(moe, onnx_path), other))).float()
        rel = _rel(got, ref)
    result.max_rel["onnx static" if static else "onnx"] = rel
    if not rel <= RTOL_ONNX:
        raise _Stop("onnxruntime", f"ONNX Runtime output differs from torch by {rel:.2e} of its largest magnitude "
                                   f"(bound {RTOL_ONNX:g})")


def check_family(model_type: str, workdir: str | Path) -> Result:
    """Take `model_type` through the sweep in `workdir` (which it fills); never raises."""
    start = time.perf_counter()
    skipped = classify(model_type)
    if skipped is not None:
        return skipped
    fam = family(model_type)
    result = Result(model_type, fam.class_name, fam.task)
    try:
        _sweep(result, Path(workdir))
        result.result, result.stage = "pass", ""
    except _Stop as stop:
        result.kind, result.result, result.stage, result.reason = stop.kind, stop.result, stop.stage, stop.reason
    except Exception as err:  # a step this module does not wrap: still one line
        result.stage, result.reason = "sweep", _line(err)
    result.reason = result.reason.replace(str(workdir), "DIR")  # the same text on every run
    result.seconds = round(time.perf_counter() - start, 2)
    return result
