"""The README's synopsis lists every option of every command, and no option that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from sparsify.cli.main import _register, app

_register()
COMMANDS = typer.main.get_command(app).commands
README = Path(__file__).resolve().parents[2] / "README.md"


def synopsis() -> dict[str, set[str]]:
    """Option strings the README's synopsis names, per command ("COMMAND": for every command)."""
    text = README.read_text()
    block = text[text.index("## Command line"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    entries: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"^sparsify (\S+)", line)
        if m:
            current = m.group(1) if not m.group(1).startswith("-") else "--"
        if current is not None:
            entries.setdefault(current, set()).update(re.findall(r"(?<![\w-])--?[a-z][\w-]*", line))
    return entries


def test_every_command_is_in_the_synopsis():
    assert set(synopsis()) - {"COMMAND", "--"} == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_synopsis_lists_every_option(name):
    listed = synopsis()[name] | synopsis()["COMMAND"]
    params = [p for p in COMMANDS[name].params if p.param_type_name == "option"]
    names = {opt for p in params for opt in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    # an option is listed by any of its names (-o for --out); a flag pair by both of its halves
    missing = [p.opts[0] for p in params if not set(p.opts) & listed or p.secondary_opts and not set(p.secondary_opts) & listed]
    assert not missing, f"missing from the README: {missing}"
    assert listed <= names, f"not options of sparsify {name}: {sorted(listed - names)}"


def test_root_options_listed():
    listed = synopsis()["--"] | synopsis()["COMMAND"]
    root = typer.main.get_command(app)
    assert {opt for p in root.params for opt in p.opts} <= listed
