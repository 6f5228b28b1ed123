"""Errors a user can cause. Each carries a one-line message saying what was wrong and what to do.

The CLI prints the message and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

__all__ = [
    "SparsifyError",
    "SourceError",
    "CaptureError",
    "NoFFNFoundError",
    "OptionError",
    "RecipeError",
    "OutputError",
    "PlanError",
    "PassError",
    "ArgumentError",
]


class SparsifyError(Exception):
    """Base of every error a user can cause; `str(err)` is a one-line explanation."""

    exit_code = 2


class SourceError(SparsifyError):
    """The model source (path, hub id, demo name, checkpoint file) cannot be read."""


class CaptureError(SparsifyError):
    """torch.export could not capture the model with the example inputs."""


class NoFFNFoundError(SparsifyError):
    """FFN discovery matched nothing; the message lists the rejected candidates and why."""


class OptionError(SparsifyError):
    """An option is out of range or contradicts another one."""


class RecipeError(OptionError):
    """A recipe (a file, or `sparsify.Recipe` keys) is malformed or does not fit the model; the
    message names the file, line and key (`moe.yaml:7: decoder.router: ...`) when there is one."""


class OutputError(SparsifyError):
    """The output location cannot be written (exists, not writable, no space)."""


class PlanError(SparsifyError):
    """A plan does not fit the model it is applied to."""


class PassError(SparsifyError):
    """A pass failed on an unexpected error; names the pass and those that ran before it."""


class ArgumentError(OptionError, TypeError):
    """A Python API function was called with a keyword it does not take (a TypeError, as Python's own)."""
