"""Options every command shares, and the lists of choices that help texts name.

The choice lists are spelt out here rather than imported from the registries that define them
(formats, dtypes, routers, ONNX targets), because those import torch and `--help` must not;
tests/cli/test_help.py checks that each list equals its registry. The demos come from
`sparsify.io.demo`, which imports nothing heavy.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..io.demo import DEMOS

__all__ = ["Quiet", "AsJson", "Verbose", "Force", "DEMO_LIST", "SOURCE_HELP", "FORMAT_CHOICES", "DTYPE_CHOICES",
           "ROUTER_CHOICES", "ONNX_TARGETS", "choices", "argument", "UpcycledDir"]

DEMO_LIST = ", ".join(f"demo:{name}" for name in DEMOS)
SOURCE_HELP = (f"A dense model: a local Hugging Face directory, a hub id (looked up in the Hugging Face cache first), "
               f"a built-in demo ({DEMO_LIST}), or an .onnx file.")
FORMAT_CHOICES = ("auto", "native", "mixtral", "qwen2-moe", "switch")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
ROUTER_CHOICES = ("topk", "switch", "expert-choice")
ONNX_TARGETS = ("ort", "standard")


def argument(metavar: str, help: str, required: bool = True) -> Any:
    """A positional argument, named in help and usage by `metavar` (a required one has no default)."""
    if required:
        return typer.Argument(metavar=metavar, show_default=False, help=help)
    return typer.Argument(metavar=f"[{metavar}]", show_default=False, help=help)


def choices(names: tuple[str, ...]) -> str:
    """'a|b|c': the metavar of an option that takes one of `names`."""
    return "|".join(names)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result line.")]
AsJson = Annotated[bool, typer.Option(
    "--json", help="Print the result as one JSON document on stdout (the figures the text shows), and nothing else there.")]
Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Explain each choice in full, and show other libraries' log lines, warnings and progress bars.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Replace OUT if it exists (only once the new output is complete).")]
UpcycledDir = Annotated[str, argument("MOE", "An upcycled model directory (written by sparsify upcycle).")]
