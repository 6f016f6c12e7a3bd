"""docs/hubctl.md documents exactly what hubctl's parser knows: every command, every option, no others.

The parser is `publisher.cli.build_parser()`, the one `hubctl` runs; the page
has a `### hubctl <command>` section per command, the global options in the
table of its `## Global options` section, and each command's own options in
the table of its section. So a command or an option added to hubctl without
a word on the page, or one the page keeps after it is gone, fails here.
"""

from __future__ import annotations

import argparse
import re

import pytest

from publisher.cli import SCRIPTS, build_parser
from tests.helpers import ROOT

PAGE = ROOT / "docs" / "hubctl.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand (argparse exposes them only through its actions)."""
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


PARSER = build_parser()
GLOBAL = _options(PARSER)  # -h/--help and the options every command also takes
COMMANDS = _subcommands(PARSER)


def _sections(level: str, prefix: str) -> dict[str, str]:
    """Heading text after `prefix` -> the section's text, for headings of `level` ("##", "###")."""
    text = PAGE.read_text()
    pattern = rf"^{level} {re.escape(prefix)}([^\n]*)\n(.*?)(?=^#{{1,{len(level)}}} |\Z)"
    return {m[1].strip(): m[2] for m in re.finditer(pattern, text, re.M | re.S)}


def _table_options(section: str) -> set[str]:
    """The options a section's table documents: the `--option` (or `-h`) opening a row's first cell."""
    return set(re.findall(r"^\| `(--?[a-z][a-z-]*)", section, re.M)) | set(
        re.findall(r"^\| `-h`, `(--help)`", section, re.M))


SECTIONS = _sections("###", "hubctl ")


def test_the_parser_is_found() -> None:
    """The helpers really read hubctl's parser, so an empty set cannot make the other tests pass."""
    assert {"publish", "disconnect", "stats"} <= set(COMMANDS)
    assert {"--redis-url", "--json", "--help"} <= GLOBAL
    assert {"--type", "--room"} <= _options(COMMANDS["publish"])


def test_every_command_has_a_section() -> None:
    """Each command of `hubctl --help` has its `### hubctl <command>` section."""
    assert sorted(set(COMMANDS) - set(SECTIONS)) == []


def test_every_documented_command_exists() -> None:
    """No section documents a command hubctl does not have."""
    assert sorted(set(SECTIONS) - set(COMMANDS)) == []


def test_every_global_option_is_in_the_global_options_table() -> None:
    """`--redis-url`, `--timeout`, `--json`, ...: a row each in the table of `## Global options`, and no other."""
    [section] = _sections("##", "Global options").values()
    assert _table_options(section) == GLOBAL


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_a_command_is_in_its_section_table(command: str) -> None:
    """A command's own options (beyond the global ones) are exactly the rows of its section's table."""
    own = _options(COMMANDS[command]) - GLOBAL
    assert _table_options(SECTIONS.get(command, "")) == own


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_argument_of_a_command_is_in_its_synopsis(command: str) -> None:
    """The section opens with the command's synopsis, naming each positional argument and choice."""
    section = SECTIONS.get(command, "")
    synopsis = re.match(r"\s*```text\n(.*?)```", section, re.S)
    assert synopsis is not None and synopsis[1].startswith(f"hubctl {command}"), section[:200]
    for action in COMMANDS[command]._actions:
        if action.option_strings:
            continue
        for word in action.choices or [action.metavar or action.dest]:
            assert re.search(rf"\b{re.escape(str(word))}\b", synopsis[1]), (command, word)


def test_the_script_sha_shown_is_the_shipped_scripts() -> None:
    """`hubctl script publish`'s SHA1 on the page is the one `SCRIPT LOAD` answers for the script shipped now."""
    shown = set(re.findall(r"\b[0-9a-f]{40}\b", SECTIONS["script"]))
    assert shown == {SCRIPTS["publish"].sha}
