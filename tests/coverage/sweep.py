"""The coverage sweep over transformers' model registry.

    python -m tests.coverage.sweep                     every family; records results.json
    python -m tests.coverage.sweep bert vit whisper    those families only (--record to merge them in)
    python -m tests.coverage.sweep --failing --record  the families that did not pass when last recorded
    python -m tests.coverage.sweep --jobs 4 --timeout 300
    python -m tests.coverage.sweep --readme            README.md's coverage table from results.json
    python -m tests.coverage.sweep --update-expected   expected_pass.txt from results.json

Each family runs in a process of its own (forked from this one, which has imported torch and
transformers once), `--jobs` at a time, killed after `--timeout` seconds. The table printed at
the end has one line per family: family, kind, result, and the stage and reason of a failure.
The sweep exits 1 when a family listed in expected_pass.txt did not pass (a family the installed
transformers lacks is reported, not failed).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tests.coverage.check import Result, check_family, classify
from tests.coverage.registry import families

__all__ = ["main", "run_families", "load_results", "expected_pass", "regressions", "HERE"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
EXPECTED = HERE / "expected_pass.txt"


def _child(model_type: str, workdir: str, conn) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    try:
        conn.send(check_family(model_type, workdir).to_dict())
    finally:
        conn.close()


def _preload() -> None:
    """Import what every family's process needs, once, before forking."""
    import onnxruntime  # noqa: F401

    import importlib

    import sparsify  # noqa: F401
    import sparsify.onnx.export  # noqa: F401
    import tests.coverage.ffn_like  # noqa: F401

    importlib.import_module("sparsify.cli.main")._register()  # the package's `main` hides the module
    _warm_onnx_exporter()


def _warm_onnx_exporter() -> None:
    """torch.onnx builds its op registry on the first export (about 10 s); do it once here."""
    import contextlib
    import io
    import warnings

    import torch

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),), dynamo=True, verbose=False)


def run_families(names: list[str], jobs: int = 2, timeout: float = 300, progress=None) -> list[Result]:
    """`check_family` of each name, `jobs` processes at a time, each killed after `timeout` s."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    _preload()
    root = Path(tempfile.mkdtemp(prefix="sparsify-sweep-"))
    todo, running, done = [], {}, {}
    for name in names:  # what the config alone decides needs no process
        skipped = classify(name)
        if skipped is None:
            todo.append(name)
        else:
            done[name] = skipped
            if progress:
                progress(skipped, len(done), len(names))
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name = todo.pop(0)
                workdir = root / name
                workdir.mkdir()
                parent, child = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(name, str(workdir), child), daemon=True)
                proc.start()
                child.close()
                running[name] = (proc, parent, time.monotonic(), workdir)
            time.sleep(0.2)
            for name, (proc, conn, started, workdir) in list(running.items()):
                result = None
                if conn.poll():
                    try:
                        result = Result.from_dict(conn.recv())
                    except EOFError:
                        pass
                elapsed = time.monotonic() - started
                if result is None and proc.is_alive() and elapsed < timeout:
                    continue
                if result is None:
                    if proc.is_alive():
                        proc.kill()
                        reason = f"timed out after {timeout:.0f} s"
                    else:
                        reason = f"the process died (exit code {proc.exitcode})"
                    result = Result(name, stage="sweep", reason=reason, seconds=round(elapsed, 2))
                proc.join(5)
                conn.close()
                shutil.rmtree(workdir, ignore_errors=True)
                del running[name]
                done[name] = result
                if progress:
                    progress(result, len(done), len(names))
    finally:
        for proc, *_ in running.values():
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return [done[n] for n in names]


def load_results(path: Path = RESULTS) -> dict[str, Result]:
    """The recorded results, by family."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {d["model_type"]: Result.from_dict(d) for d in data["results"]}


def save_results(results: dict[str, Result], path: Path = RESULTS) -> None:
    """Record `results` (sorted by family) with the versions they were measured with, written
    whole to a temporary file and renamed over `path` (a reader never sees half a file)."""
    import torch
    import transformers

    data = {"transformers": transformers.__version__, "torch": torch.__version__,
            "results": [results[k].to_dict() for k in sorted(results)]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path = RESULTS):
    """Hold an exclusive lock on `path`'s directory: sweeps run at once (two `--record` runs)
    take turns to read, change and write results.json, so none drops another's records. By hand
    (fcntl) rather than with `filelock`, which would leave a lock file beside results.json."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_results(update: Callable[[dict[str, Result]], dict[str, Result]], path: Path = RESULTS) -> None:
    """Apply `update` to the results on disk now (not as they were when this sweep began) and save."""
    with _locked(path):
        save_results(update(load_results(path)), path)


def expected_pass(path: Path = EXPECTED) -> list[str]:
    """The families that must pass (one a line; '#' starts a comment)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def regressions(results: dict[str, Result], expected: list[str]) -> list[Result]:
    """Expected families that were swept and did not pass (missing families excluded)."""
    return [r for n in expected if (r := results.get(n)) is not None and r.result != "pass" and r.stage != "missing"]


def row(r: Result) -> str:
    """One line of the table."""
    why = f"{r.stage}: {r.reason}" if r.result != "pass" else ", ".join(f"{k} {v:.1e}" for k, v in r.max_rel.items())
    return f"{r.model_type:<32} {r.kind:<9} {r.result:<4}  {why}"


def _print_table(results: list[Result]) -> None:
    order = {"pass": 0, "fail": 1, "skip": 2}
    print(f"{'family':<32} {'kind':<9} {'result':<5} reason")
    for r in sorted(results, key=lambda r: (r.kind != "dense", r.kind, order[r.result], r.model_type)):
        print(row(r))
    dense = [r for r in results if r.kind == "dense" and r.stage != "missing"]
    passed = sum(r.result == "pass" for r in dense)
    kinds = {k: sum(r.kind == k and r.stage != "missing" for r in results) for k in ("no-ffn", "moe", "composite")}
    kinds["missing"] = sum(r.stage == "missing" for r in results)
    print(f"\ndense families: {passed} of {len(dense)} pass; not swept: "
          + ", ".join(f"{n} {k}" for k, n in kinds.items()))


def main(argv: list[str] | None = None) -> int:
    """The command (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m tests.coverage.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="model types to sweep [default: every family of the registry]")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per family")
    ap.add_argument("--failing", action="store_true", help="sweep the dense families that did not pass in results.json")
    ap.add_argument("--record", action="store_true", help="merge these results into results.json (a full sweep always does)")
    ap.add_argument("--readme", action="store_true", help="rewrite README.md's coverage table from results.json")
    ap.add_argument("--update-expected", action="store_true", help="write expected_pass.txt from results.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.readme or args.update_expected:
        from tests.coverage.report import update_expected, update_readme

        if args.readme:
            update_readme(load_results())
        if args.update_expected:
            update_expected(load_results())
        return 0
    if args.failing:
        args.families += [r.model_type for r in load_results().values()
                          if r.kind == "dense" and r.result != "pass" and r.model_type not in args.families]
        if not args.families:
            print("no family failed when last recorded")
            return 0
    names = args.families or [f.model_type for f in families()]

    record = not args.families or args.record

    def progress(r: Result, n: int, total: int) -> None:
        print(f"[{n}/{total}] {row(r)}  ({r.seconds:.0f} s)", flush=True)
        if record:  # saved as each family ends, so that an interrupted sweep keeps what it measured
            record_results(lambda recorded: {**recorded, r.model_type: r})

    results = run_families(names, jobs=args.jobs, timeout=args.timeout, progress=progress)
    print()
    _print_table(results)
    if not args.families:  # a whole sweep also forgets families the registry no longer has
        record_results(lambda recorded: {n: recorded[n] for n in names if n in recorded})
    bad = regressions({r.model_type: r for r in results}, expected_pass())
    for r in bad:
        print(f"REGRESSION: {r.model_type} is expected to pass: {r.stage}: {r.reason}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
