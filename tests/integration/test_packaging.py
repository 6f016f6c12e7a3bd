"""What `pip install .` gives users carries everything the node needs at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_wheel_carries_lua_scripts_and_static_files(tmp_path: Path) -> None:
    """A non-editable build includes the Lua scripts, the pages and hub.js, and both console scripts."""
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    if not had_build:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next(tmp_path.glob("hubnode-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hubnode/membership/lua").glob("*.lua")}
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hubnode/static").iterdir() if p.is_file()}
    assert len(lua) >= 10 and {"hubnode/static/index.html", "hubnode/static/hub.js"} <= static
    assert lua <= names and static <= names, sorted((lua | static) - names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hubnode = hubnode.cli:main" in entry_points and "hubctl = publisher.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)
