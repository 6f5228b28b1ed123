"""The `sparsify` command. Each command lives in its own module and registers itself here.

Errors a user can cause (`SparsifyError`) print one line and exit non-zero; no traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from ..errors import SparsifyError
from ..io.signals import Interrupted, handle_signals

__all__ = ["app", "main", "console", "err_console"]

app = typer.Typer(
    name="sparsify",
    help="Turn dense transformer checkpoints into Mixture-of-Experts models (sparse upcycling).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Without a terminal rich assumes 80 columns; tables of module paths need more.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _register() -> None:
    # Every other module of this package defines commands and adds them to `app` on import,
    # so a new command is a new file; nothing here changes.
    import importlib
    import pkgutil

    from .. import cli

    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda i: i.name):
        if info.name not in ("main", "common"):
            importlib.import_module(f"{cli.__name__}.{info.name}")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True)) -> None:
    if version:
        from .. import __version__

        console.print(f"sparsify {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register()
    with handle_signals():
        try:
            return _run(argv)
        except Interrupted as err:
            from rich.markup import escape

            from ..io.atomic import remove_live_temporaries

            remove_live_temporaries()
            err_console.print(escape(str(err)), style="bold red", highlight=False, soft_wrap=True)
            return err.exit_code


def _run(argv: list[str] | None) -> int:
    try:
        # Outside standalone mode click returns the code of typer.Exit instead of raising it.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int):
            return code
    except SparsifyError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return err.exit_code
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]; nothing was written")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as err:
        # Usage errors come from the click that typer vendors; recognise them by shape, and keep
        # them to one line like every other error.
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            err_console.print(f"[bold red]error:[/] {err.format_message()} (see --help)", highlight=False, soft_wrap=True)
            return err.exit_code
        if type(err).__name__ == "Abort":
            err_console.print("[bold red]aborted[/]; nothing was written")
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
