"""docs/configuration.md's tables are the `hubnode` command line: they cannot drift from the code.

Each table row is `| flag(s) | env | default | meaning |`. The flags come from the parser the command
uses (hubnode.config.build_parser), the variable of each flag from what `parse_args` reads instead of
it, and the defaults from the Config that `parse_args` builds with nothing set: nothing here repeats
the code's naming rule or a default.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from hubnode.config import Config, build_parser, parse_args
from hubnode.validate import RULES, Invalid
from tests.helpers import ROOT

PAGE = ROOT / "docs/configuration.md"
CELL_SPLIT = re.compile(r"(?<!\\)\|")
CODE = re.compile(r"`([^`]+)`")
LITERAL_DEFAULT = re.compile(r"^`([^`]*)`(?:\s*\([^)]*\))?$")  # `value`, optionally followed by a remark
NONE = "—"
ENV_READ = re.compile(r"\b(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*[\"'](HUB_[A-Z0-9_]+)[\"']")
# Values a flag is given to see which variable parse_args then leaves unread; the first one the
# setting's own rule accepts is used. A new setting that takes none of them fails the test below.
CANDIDATES = ("1", "on", "none", "info", "text", "127.0.0.1", "https://app.example.com",
              "redis://127.0.0.1:6379/0", "hub:", "k" * 40, "*")


class Row:
    """One table row: its flags, its variable and its default cell as written."""

    def __init__(self, line: int, cells: list[str]) -> None:
        self.line = line
        self.flags = CODE.findall(cells[0])
        self.envs = CODE.findall(cells[1])
        self.default = cells[2]

    def __repr__(self) -> str:
        return f"docs/configuration.md:{self.line} {', '.join(self.flags)}"


def rows(page: Path = PAGE) -> list[Row]:
    """The rows of every table whose first column names a flag."""
    found = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in CELL_SPLIT.split(line.strip().strip("|"))]
        if len(cells) == 4 and cells[0].startswith("`--"):
            found.append(Row(number, cells))
    return found


ROWS = rows()
PARSER = build_parser()
ACTIONS = {opt: action for action in PARSER._actions for opt in action.option_strings}


class RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.asked.append(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read(argv: list[str]) -> set[str]:
    """The variables `parse_args(argv)` asks the environment for (all of them are unset)."""
    env = RecordingEnv()
    try:
        parse_args(argv, env)
    except SystemExit:  # a combination Config refuses: the environment was read before that
        pass
    return set(env.asked)


def argv_for(option: str) -> list[str]:
    """`option` on a command line, with a value its setting accepts when it takes one."""
    action = ACTIONS[option]
    if action.nargs == 0 or action.nargs == "?":  # --no-compression; `--client-private` alone means on
        return [option]
    for value in CANDIDATES:
        try:
            RULES[action.dest].parse(value)
        except Invalid:
            continue
        return [f"{option}={value}"]
    raise AssertionError(f"no value in CANDIDATES suits {option}: add one")


def defaults() -> Config:
    return parse_args([], {})


def missing_flags(found: list[Row]) -> set[str]:
    return {opt for opt in ACTIONS if opt not in ("-h", "--help")} - {flag for row in found for flag in row.flags}


def unknown_flags(found: list[Row]) -> list[str]:
    return [flag for row in found for flag in row.flags if flag not in ACTIONS]


def variable_problem(row: Row) -> str | None:
    """With a flag given, parse_args leaves exactly one variable unread: it must be the row's."""
    everything = variables_read([])
    for flag in row.flags:
        unread = everything - variables_read(argv_for(flag))
        if unread != set(row.envs):
            return f"{row}: {flag} replaces {sorted(unread)}, the page says {row.envs}"
    return None


def default_problem(row: Row) -> str | None:
    """A literal default (`value`, or — for none) must be what an unconfigured node uses; a default in
    words is only for a value the code computes (a factory, or one that depends on other settings)."""
    dest = ACTIONS[row.flags[0]].dest
    effective = getattr(defaults(), dest)
    declared = {f.name: f for f in fields(Config)}[dest]
    computed = declared.default is MISSING or (declared.default is None and effective is not None)
    literal = LITERAL_DEFAULT.match(row.default)
    if row.default == NONE:
        return None if effective in (None, ()) else f"{row}: the page says none, the code uses {effective!r}"
    if literal:
        if computed:
            return f"{row}: the code computes this default; the page says {row.default}"
        try:
            value = RULES[dest].parse(literal[1])
        except Invalid as exc:
            return f"{row}: the default {literal[1]!r} is not a value of the setting ({exc})"
        return None if value == effective else f"{row}: the page says {literal[1]!r}, the code uses {effective!r}"
    if not computed:
        return f"{row}: write the default as the code's value, `{effective}`"
    return None if row.default else f"{row}: no default given"


def test_the_page_has_tables_of_flags() -> None:
    assert len(ROWS) >= 20, ROWS
    assert all(row.flags and len(row.envs) == 1 for row in ROWS), [r for r in ROWS if len(r.envs) != 1]


def test_every_option_of_the_parser_is_documented() -> None:
    assert not missing_flags(ROWS), f"flags missing from docs/configuration.md: {sorted(missing_flags(ROWS))}"


def test_every_documented_flag_exists_once() -> None:
    assert not unknown_flags(ROWS), f"docs/configuration.md lists flags hubnode does not have: {unknown_flags(ROWS)}"
    flags = [flag for row in ROWS for flag in row.flags]
    repeated = sorted({f for f in flags if flags.count(f) > 1})
    assert not repeated, f"flags listed twice: {repeated}"


def test_the_flags_of_a_row_set_one_setting() -> None:
    """`--compression` and `--no-compression` share a row: they are one setting."""
    for row in ROWS:
        assert len({ACTIONS[flag].dest for flag in row.flags}) == 1, row


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_each_rows_variable_is_the_one_its_flags_replace(row: Row) -> None:
    assert variable_problem(row) is None, variable_problem(row)


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_each_rows_default_is_the_codes(row: Row) -> None:
    assert default_problem(row) is None, default_problem(row)


def test_every_variable_the_node_reads_is_documented() -> None:
    """What parse_args asks the environment for, and any variable hubnode's code reads by name."""
    documented = {env for row in ROWS for env in row.envs}
    assert variables_read([]) <= documented, sorted(variables_read([]) - documented)
    by_name: set[str] = set()
    elsewhere: list[str] = []
    for source in sorted((ROOT / "hubnode").rglob("*.py")):
        text = source.read_text()
        by_name |= set(ENV_READ.findall(text))
        if re.search(r"\b(?:environ|getenv)\b", ENV_READ.sub("", text)):
            elsewhere.append(source.relative_to(ROOT).as_posix())
    assert by_name <= documented, f"variables hubnode reads, missing from the page: {sorted(by_name - documented)}"
    # any other use of the process environment is parse_args's, whose reads are checked above
    assert elsewhere == ["hubnode/config.py"], elsewhere


def test_the_checks_catch_a_drifted_page(tmp_path: Path) -> None:
    """A wrong variable, a wrong or computed default, an unknown flag and a missing one are all reported."""
    page = tmp_path / "configuration.md"
    page.write_text("| flag | env | default | meaning |\n|---|---|---|---|\n"
                    "| `--port` | `HUB_PORT` | `8081` | x |\n"
                    "| `--host` | `HUB_BIND` | `127.0.0.1` (loopback) | x |\n"
                    "| `--node-id` | `HUB_NODE_ID` | `node1` | x |\n"
                    "| `--log-level` | `HUB_LOG_LEVEL` | what you like | x |\n"
                    "| `--compression`, `--no-compression` | `HUB_COMPRESSION` | `on` | x |\n"
                    "| `--bogus` | `HUB_BOGUS` | — | x |\n")
    port, host, node_id, log_level, compression, bogus = rows(page)
    assert "'8081'" in str(default_problem(port)) and variable_problem(port) is None
    assert "HUB_HOST" in str(variable_problem(host)) and default_problem(host) is None
    assert "computes" in str(default_problem(node_id))
    assert "`info`" in str(default_problem(log_level))
    assert variable_problem(compression) is None and default_problem(compression) is None
    assert unknown_flags([bogus]) == ["--bogus"] and "--redis-url" in missing_flags([port, host])
