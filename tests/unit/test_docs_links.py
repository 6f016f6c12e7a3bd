"""The repository's documentation stands on its own: every link in its Markdown points inside it, at a
file that exists and, with `#anchor`, at a heading that exists (GitHub's heading slugs).

Issue 17: the README sent readers to a contract file outside the repository. Bare URLs in prose
count as links too (GitHub makes them clickable); only the reader's own machine (127.0.0.1,
localhost) and the reserved example domains may appear there.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.helpers import ROOT

SKIP_DIRS = {".git", ".venv", "node_modules", "build", "test-output", ".pytest_cache", ".mypy_cache",
             ".ruff_cache", "out"}
PAGES = sorted(p for p in ROOT.rglob("*.md")
               if not SKIP_DIRS & set(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info"))
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML = re.compile(r"<(?:a|img)\b[^>]*\b(?:href|src)=\"([^\"]+)\"", re.I)
BARE = re.compile(r"\b(?:https?|ftp)://[^\s)>\]\"'`]+|\bwww\.[a-z0-9-]+\.[a-z]{2,}\S*", re.I)
LOCAL = re.compile(r"^(?:https?|wss?)://(?:127\.0\.0\.1|localhost|\[::1\]|0\.0\.0\.0|[^/\s]*\.?example"
                   r"(?:\.(?:com|org|net))?|[^/\s]+\.(?:example|test|invalid|localhost))(?:[:/]|$)", re.I)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code: what GitHub renders as links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation gone, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>|[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    stripped = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", stripped, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", stripped))
    return found


def targets(page: Path) -> list[str]:
    text = prose(page.read_text())
    return LINK.findall(text) + REFERENCE.findall(text) + HTML.findall(text)


def test_there_are_pages_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "CHANGELOG.md", "docs/protocol.md", "docs/redis.md", "docs/http-api.md",
            "docs/configuration.md", "docs/operations.md", "docs/browser.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_link_points_inside_the_repository_at_something_that_exists(page: Path) -> None:
    problems = []
    for target in targets(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            problems.append(f"{target}: points outside the repository")
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    for url in BARE.findall(prose(page.read_text())):
        if not LOCAL.match(url):
            problems.append(f"{url}: a bare URL outside the repository")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_must(tmp_path: Path) -> None:
    """The link patterns see the forms Markdown has, so a passing page is not a page nobody read."""
    page = tmp_path / "p.md"
    page.write_text("# A `Title`: here\n[a](https://x.org) ![i](img/x.png)\n[r]: ../../up.md\n"
                    "<a href=\"mailto:m@x.org\">m</a> see https://pypi.org/x and `https://in.code` and "
                    "http://127.0.0.1:8080/ws\n```\nhttps://in.block\n```\n")
    assert targets(page) == ["https://x.org", "img/x.png", "../../up.md", "mailto:m@x.org"]
    assert [u for u in BARE.findall(prose(page.read_text())) if not LOCAL.match(u)] == ["https://x.org",
                                                                               "https://pypi.org/x"]
    assert anchors(page) == {"a-title-here"}
    assert slug("hubnode.client") == "hubnodeclient" and slug("`--max-connections`") == "--max-connections"
