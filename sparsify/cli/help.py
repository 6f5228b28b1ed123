"""How `sparsify CMD --help` reads: click's plain layout, every value named by its metavar.

Typer tags each argument with its Python type (`SOURCE <str>`), writes required arguments as
`{SOURCE}` in the usage line, and wraps a default given as text in parentheses
(`[default: (2; 1 for switch)]`); none of it can be switched off by a setting, so this command
class formats arguments and text defaults itself and leaves everything else to typer.
"""

from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperGroup

__all__ = ["Command", "Group"]


class _HelpDefaultsToFalse:
    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


class Group(_HelpDefaultsToFalse, TyperGroup):
    """The `sparsify` group: typer's, with the help flag defaulting to False."""


class Command(_HelpDefaultsToFalse, TyperCommand):
    """A typer command with untyped argument names and unwrapped text defaults in its help."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                arguments.append((param.metavar or param.name.upper(), param.help or ""))
                continue
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, text = record
            if isinstance(param.show_default, str):
                text = text.replace(f"default: ({param.show_default})", f"default: {param.show_default}")
            options.append((name, text))
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)
