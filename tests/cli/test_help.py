"""Help texts: a default on every option that has one, no type tags, no broken text, the real
lists of demos and choices."""

from __future__ import annotations

import re

import pytest
import typer

from sparsify.cli.main import _register, app
from sparsify.cli.options import DTYPE_CHOICES, FORMAT_CHOICES, ONNX_TARGETS, ROUTER_CHOICES

_register()
COMMANDS = typer.main.get_command(app).commands


@pytest.fixture(scope="module")
def helps(request):
    from tests.conftest import run_cli

    return {name: run_cli(name, "--help") for name in COMMANDS}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_clean(helps, name):
    r = helps[name]
    assert r.returncode == 0 and not r.stderr, r.stderr
    text = r.stdout
    assert not re.search(r"<(int|str|bool|float|path)>|\b(INTEGER|TEXT|FLOAT|BOOLEAN)\b|\{[A-Z]+\}", text), text
    assert not re.search(r"\s\.(\s|$)", text), text  # "Experts per token ." (swallowed markup)
    assert "[default: (" not in text
    assert f"Usage: sparsify {name} [OPTIONS]" in text
    for option in ("--quiet", "--json", "--verbose", "-h, --help"):
        assert option in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    command = COMMANDS[name]
    for param in command.params:
        assert param.help, f"{name} {param.name} has no help"
        if param.param_type_name != "option" or param.required or getattr(param, "is_flag", False) and param.default is False:
            continue
        # value options: a default value, or the text saying what the default is
        assert param.default is not None or isinstance(param.show_default, str), f"{name} {param.opts}: no default shown"


DEFAULTS = {
    ("upcycle", "--top-k"): "[default: 2; 1 with --router switch]",
    ("upcycle", "--every"): "[default: 2; 1 with --format mixtral]",
    ("upcycle", "--router"): "[default: topk",
    ("upcycle", "--dtype"): "[default: the source's]",
    ("upcycle", "--capacity-factor"): "[default: none: dropless]",
    ("upcycle", "--format"): "[default: auto]",
    ("upcycle", "--shard-size"): "[default: 5GB]",
    ("verify", "--atol"): "[default: 1e-5 x the largest dense output]",
    ("export", "--opset"): "[default: 18]",
    ("profile", "--seq-len"): "[default: 128]",
    ("partition", "--tolerance"): "[default: 0.01]",
}


def option_entries(help_text: str) -> dict[str, str]:
    """Each option's entry in the Options section, wrapping undone, keyed by its long name."""
    entries, current = {}, None
    for line in help_text[help_text.index("Options:"):].splitlines()[1:]:
        if re.match(r"^  -", line):
            current = re.search(r"--[\w-]+", line).group(0)
            entries[current] = line.strip()
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("key", list(DEFAULTS), ids=lambda k: " ".join(k))
def test_defaults_in_help(helps, key):
    name, option = key
    entry = option_entries(helps[name].stdout)[option]
    assert DEFAULTS[key] in entry, entry


def test_demo_list_is_complete(helps):
    from sparsify.io.demo import DEMOS

    text = " ".join(helps["upcycle"].stdout.split())
    for name in DEMOS:
        assert f"demo:{name}," in text or f"demo:{name})" in text, name


def test_choice_lists_match_their_registries():
    from sparsify.convert import DTYPE_NAMES
    from sparsify.formats.registry import FORMAT_NAMES
    from sparsify.moe.config import ROUTER_KINDS
    from sparsify.onnx.export import TARGETS

    assert FORMAT_CHOICES == tuple(FORMAT_NAMES)
    assert DTYPE_CHOICES == tuple(DTYPE_NAMES)
    assert ROUTER_CHOICES == tuple(ROUTER_KINDS)
    assert ONNX_TARGETS == tuple(TARGETS)
