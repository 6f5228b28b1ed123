"""The `sparsify` command. Each command lives in its own module and registers itself here.

Errors a user can cause (`SparsifyError`) print one line and exit non-zero; no traceback.
Nothing heavy is imported until a command runs: `--help`, `--version` and usage errors answer
without torch (tests/cli/test_fast_start.py checks it).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Annotated, Any, Callable

import typer
from rich.console import Console

from ..errors import SparsifyError
from ..io.signals import Interrupted, handle_signals
from .help import Command, Group
from .options import AsJson, Quiet, Verbose
from .output import Output

__all__ = ["app", "main", "command", "console", "err_console"]

app = typer.Typer(
    name="sparsify",
    cls=Group,
    help="Turn dense transformer checkpoints into Mixture-of-Experts models (sparse upcycling).",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
# Without a terminal rich assumes 80 columns; error lines name paths and need more.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# The modules of this package that define no command.
_HELPERS = {"main", "common", "help", "options", "output"}


def command(**kwargs: Any) -> Callable:
    """Register a command: `app.command` with sparsify's help layout (see `help.Command`), and
    the options every command has. The function takes the run's `Output` as its first argument;
    the command gets --quiet, --json and --verbose and runs inside that Output."""

    def register(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = list(signature.parameters.values())[1:]  # the first is the Output
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation)
                  for name, annotation in (("quiet", Quiet), ("as_json", AsJson), ("verbose", Verbose))]

        @functools.wraps(fn)
        def run(*args: Any, quiet: bool = False, as_json: bool = False, verbose: bool = False, **options: Any) -> Any:
            with Output(quiet, as_json, verbose) as o:
                return fn(o, *args, **options)

        run.__signature__ = signature.replace(parameters=[*own, *shared])  # what typer reads the options from
        app.command(cls=Command, **kwargs)(run)
        return fn

    return register


def _register() -> None:
    # Every other module of this package defines commands and adds them to `app` on import,
    # so a new command is a new file; nothing here changes.
    import importlib
    import pkgutil

    from .. import cli

    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda i: i.name):
        if info.name not in _HELPERS:
            importlib.import_module(f"{cli.__name__}.{info.name}")


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"sparsify {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["--help"]  # bare `sparsify`: the help, not an error
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
        code = app(args=argv, prog_name="sparsify", standalone_mode=False)
        if isinstance(code, int):
            return code
    except SparsifyError as err:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
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
            from rich.markup import escape

            err_console.print(f"[bold red]error:[/] {escape(err.format_message())} (see --help)", highlight=False,
                              soft_wrap=True)
            return err.exit_code
        if type(err).__name__ == "Abort":
            err_console.print("[bold red]aborted[/]; nothing was written")
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
