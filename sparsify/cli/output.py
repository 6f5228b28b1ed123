"""What a command prints and where: results on stdout, progress on stderr, other libraries quiet.

Every command runs inside one `Output`:

- text mode prints details and a result line; `--quiet` keeps only the result line (and errors);
- `--json` prints one JSON document on stdout and nothing else there;
- progress is a transient spinner (or bar) on stderr, shown only on a terminal, never with --quiet;
- other libraries' output (transformers' and huggingface_hub's progress bars, torch's and
  onnxscript's log lines, Python warnings, stray prints) is silenced unless `--verbose`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..units import format_bytes

__all__ = ["Output"]

# Without a terminal rich assumes 80 columns; tables of module paths need more.
_PIPE_WIDTH = 160
# Read by these libraries when they are imported (the usual case: commands import them lazily).
_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's bars, and transformers' "Loading weights"
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TORCH_LOGS": "-torch",  # torch's log lines (torch.onnx: "torchvision is not installed ...")
}
_LOGGERS = ("torch", "transformers", "huggingface_hub", "onnxscript", "onnx_ir", "onnxruntime", "accelerate")


class Output:
    """The streams, modes and progress display of one command run (a context manager)."""

    def __init__(self, quiet: bool = False, as_json: bool = False, verbose: bool = False):
        self.quiet, self.json, self.verbose = quiet, as_json, verbose
        # Bound now: while the command runs, sys.stdout/sys.stderr may point at a sink.
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.console = _console(self.stdout)
        self.err = _console(self.stderr)
        self._progress: Progress | None = None
        self._task: Any = None
        self._stack = contextlib.ExitStack()
        self._captured = io.StringIO()

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> "Output":
        if not self.verbose:
            self._stack.enter_context(_quiet_libraries())
            self._stack.enter_context(contextlib.redirect_stdout(self._captured))
            self._stack.enter_context(contextlib.redirect_stderr(self._captured))
        elif self.json:  # keep stdout for the one JSON document
            self._stack.enter_context(contextlib.redirect_stdout(self.stderr))
        return self

    def __exit__(self, kind, err, tb) -> None:
        self._stop_progress()
        self._stack.close()
        from ..errors import SparsifyError

        if err is not None and not isinstance(err, (SparsifyError, KeyboardInterrupt, SystemExit, typer.Exit)):
            # An unexpected failure: what the libraries said may explain it.
            self.stderr.write(self._captured.getvalue())

    # -- text -------------------------------------------------------------------------------

    @property
    def text(self) -> bool:
        """True when details are printed (text mode, not --quiet)."""
        return not (self.quiet or self.json)

    def detail(self, line: str, style: str | None = None) -> None:
        """A line of the text report (not with --quiet or --json)."""
        if self.text:
            self._stop_progress()
            self.console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)

    def explain(self, line: str) -> None:
        """A line shown only with --verbose (the reasoning behind a choice)."""
        if self.verbose:
            self.detail(line)

    def table(self, table: Any) -> None:
        """A rich table (not with --quiet or --json)."""
        if self.text:
            self._stop_progress()
            self.console.print(table)

    def result(self, line: str, style: str | None = None) -> None:
        """The command's result line: printed in text mode, --quiet included."""
        if not self.json:
            self._stop_progress()
            self.console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)

    def emit(self, doc: dict[str, Any]) -> None:
        """The --json document (nothing in text mode)."""
        if self.json:
            self._stop_progress()
            self.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
            self.stdout.flush()

    # -- progress ---------------------------------------------------------------------------

    def step(self, description: str) -> None:
        """Show `description` with a spinner and the elapsed time until the next step."""
        self.advance(description, 0, None)

    def advance(self, description: str, done: int, total: int | None) -> None:
        """Show `description` with a bar of `done` of `total` bytes (a spinner when total is None)."""
        if self.quiet or not self.err.is_terminal:
            return
        if self._progress is None:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.fields[amount]}"), TimeElapsedColumn())
            self._progress = Progress(*columns, console=self.err, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(description, total=None, amount="")
        amount = f"{format_bytes(done)} / {format_bytes(total)}" if total else ""
        self._progress.update(self._task, description=description, completed=done, total=total, amount=amount)

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _console(stream: Any) -> Console:
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else _PIPE_WIDTH, highlight=False, markup=False, emoji=False)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence other libraries' progress bars, log lines and warnings for the block."""
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # Libraries imported before (a second command in one process, the tests) read no more
    # environment; tell them directly, and put their settings back afterwards.
    loggers = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.split(".")[0] in _LOGGERS]
    levels = [(lg, lg.level) for lg in loggers if isinstance(lg, logging.Logger)]
    for lg, _ in levels:
        lg.setLevel(logging.ERROR)
    restore = [_quiet_transformers(), _quiet_hub()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for key, value in saved_env.items():  # first: huggingface_hub refuses bars while its variable is set
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for undo in restore:
            undo()
        for lg, level in levels:
            lg.setLevel(level)


def _quiet_transformers():
    if "transformers" not in sys.modules:
        return lambda: None
    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()

    def undo() -> None:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()

    return undo


def _quiet_hub():
    if "huggingface_hub" not in sys.modules:
        return lambda: None
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    return (lambda: None) if was_disabled else enable_progress_bars
