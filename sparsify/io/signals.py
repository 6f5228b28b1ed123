"""SIGINT, SIGTERM and SIGHUP end a run cleanly: this run's temporaries are removed, one line
says what was (not) written, and the exit code is the conventional 128 + the signal number.

Python runs signal handlers in the main thread, between bytecodes. The handler installed by
`handle_signals` raises `Interrupted` there, so every `except BaseException` on the way up runs
as it does for any error (the atomic writers remove their temporaries in one). `Interrupted` is
not a KeyboardInterrupt, which click would turn into a blank line and an Abort. Where an
exception must not land (while an output is swapped in, while a temporary is removed),
`deferred_signals()` holds a signal until the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["Interrupted", "handle_signals", "deferred_signals", "HANDLED"]

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_depth = 0
_pending: int | None = None
_raised = False


class Interrupted(BaseException):
    """The run was ended by signal `signum`; `str(err)` says what became of the outputs."""

    def __init__(self, signum: int, active: Sequence = (), done: Sequence[Path] = ()):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.active = list(active)  # sparsify.io.atomic.Write of each write in progress
        self.done = list(done)

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.active:
            outs = {}
            for w in self.active:
                outs[str(w.out)] = outs.get(str(w.out), False) or w.existed
            kept = [f"'{o}'" for o, existed in outs.items() if existed]
            new = [f"'{o}'" for o, existed in outs.items() if not existed]
            parts = []
            if kept:
                parts.append(f"the previous {', '.join(kept)} {'is' if len(kept) == 1 else 'are'} untouched")
            if new:
                parts.append(f"{', '.join(new)} {'was' if len(new) == 1 else 'were'} not created")
            return f"interrupted by {name}; nothing was written ({'; '.join(parts)})"
        if self.done:
            return f"interrupted by {name} after '{self.done[-1]}' was written completely"
        return f"interrupted by {name}; nothing was written"


def _raise(signum: int) -> None:
    global _raised
    from .atomic import completed_writes, live_temporaries

    _raised = True
    raise Interrupted(signum, list(live_temporaries().values()), completed_writes())


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _raised:
        return  # the first signal's exception is on its way up, cleaning as it goes
    if _depth:
        _pending = signum
        return
    _raise(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a signal that arrives inside the block until it ends (then it is raised)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            _raise(signum)


@contextlib.contextmanager
def handle_signals(signals: Sequence[int] = HANDLED) -> Iterator[None]:
    """Within the block, the given signals raise `Interrupted` (deferred where that matters).
    A signal that is ignored when the block starts (SIGHUP under nohup) stays ignored. Only in
    the main thread, where Python runs handlers; elsewhere the block changes nothing."""
    global _raised, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, _handler)
    _raised, _pending = False, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
