"""What users install: the wheel carries what the node needs, and a worker installs the publisher alone.

examples/worker.py and examples/test_worker.py are run as they are, the worker
from a fresh venv holding only `pip install hubnode` (issue 12: a worker could
not install the publisher without aiohttp, PyJWT, prometheus-client and the node).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, Client, NodeProcess, RedisServer

SERVER_ONLY = {"aiohttp", "orjson", "prometheus-client", "pyjwt", "cryptography", "uvloop"}
EXAMPLES = ROOT / "examples"


def copy_example(name: str, folder: Path) -> None:
    """examples/<name> into `folder`/examples, byte for byte: its first line's command runs in `folder` as it
    would in the repository, away from the repository's source tree."""
    (folder / "examples").mkdir(exist_ok=True)
    shutil.copyfile(EXAMPLES / name, folder / "examples" / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A non-editable build of the repository, and what the build printed."""
    out_dir = tmp_path_factory.mktemp("wheel")
    had_build = (ROOT / "build").exists()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out_dir), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    if not had_build:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert built.returncode == 0, built.stderr
    yield next(out_dir.glob("hubnode-*.whl")), built.stdout + built.stderr


def test_wheel_carries_lua_scripts_and_static_files(wheel: tuple[Path, str]) -> None:
    """A non-editable build includes the Lua scripts, the pages and hub.js, and both console scripts."""
    names = set(zipfile.ZipFile(wheel[0]).namelist())
    lua = {p.relative_to(ROOT).as_posix() for folder in ("hubnode/membership/lua", "publisher/lua")
           for p in (ROOT / folder).glob("*.lua")}
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hubnode/static").iterdir() if p.is_file()}
    assert {"publisher/lua/publish.lua", "publisher/lua/read.lua"} <= lua
    assert len(lua) >= 12 and {"hubnode/static/index.html", "hubnode/static/hub.js"} <= static
    assert lua <= names and static <= names, sorted((lua | static) - names)
    entry_points = zipfile.ZipFile(wheel[0]).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hubnode = hubnode.cli:main" in entry_points and "hubctl = publisher.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


def test_build_prints_no_deprecation(wheel: tuple[Path, str]) -> None:
    """`license` is an SPDX string: setuptools no longer warns about a TOML table on every install."""
    assert "deprecat" not in wheel[1].lower(), wheel[1]
    metadata = zipfile.ZipFile(wheel[0])
    text = metadata.read(next(n for n in metadata.namelist() if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in metadata.namelist())  # the text travels along


@pytest.fixture(scope="module")
def worker_venv(wheel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only `pip install hubnode` (the wheel, its dependencies from the index)."""
    home = tmp_path_factory.mktemp("worker-venv")
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel[0])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return home


def test_publisher_install_carries_nothing_of_the_node(worker_venv: Path) -> None:
    """redis, hiredis and msgpack; none of the node's libraries; `hubnode` explains the extra in one line."""
    listed = subprocess.run([str(worker_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"hubnode", "redis", "hiredis", "msgpack"} <= installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY
    assert subprocess.run([str(worker_venv / "bin" / "hubctl"), "--help"], capture_output=True).returncode == 0
    node = subprocess.run([str(worker_venv / "bin" / "hubnode")], capture_output=True, text=True, timeout=30)
    assert node.returncode == 2 and node.stderr.count("\n") == 1, node.stderr
    assert "pip install 'hubnode[server]'" in node.stderr and "Traceback" not in node.stderr


def test_the_client_without_its_extra_says_which_to_install(worker_venv: Path) -> None:
    ran = subprocess.run([str(worker_venv / "bin" / "python"), "-c", "import hubnode.client"],
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 1 and "pip install 'hubnode[client]'" in ran.stderr.splitlines()[-1], ran.stderr


@pytest.fixture(scope="module")
def client_venv(wheel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only `pip install 'hubnode[client]'`."""
    home = tmp_path_factory.mktemp("client-venv")
    venv.create(home, with_pip=True)
    done = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"hubnode[client] @ {wheel[0].as_uri()}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return home


async def test_the_client_extra_runs_a_client_without_the_node(client_venv: Path, tmp_path: Path) -> None:
    """aiohttp and nothing else of the node; hubnode.client connects, joins and gets its own message back."""
    listed = subprocess.run([str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert "aiohttp" in installed and not installed & (SERVER_ONLY - {"aiohttp"}), installed & SERVER_ONLY
    node = NodeProcess("--rate", "0").start()
    script = tmp_path / "echo.py"
    script.write_text(
        "import asyncio, sys\n"
        "from hubnode.client import HubClient\n"
        "async def main():\n"
        "    async with HubClient(sys.argv[1], user_id='py') as hub:\n"
        "        await hub.join('echo')\n"
        "        await hub.send_to_room('echo', 'hello')\n"
        "        async for msg in hub:\n"
        "            if msg['type'] == 'room_message':\n"
        "                print(msg['user_id'], msg['data']['message'])\n"
        "                return\n"
        "asyncio.run(main())\n")
    try:
        ran = subprocess.run([str(client_venv / "bin" / "python"), str(script), node.ws_url],
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and ran.stdout == "py hello\n", ran.stderr
    finally:
        node.stop()


async def test_example_worker_runs_as_written_from_the_fresh_venv(worker_venv: Path, tmp_path: Path,
                                                                   session: aiohttp.ClientSession) -> None:
    """`python examples/worker.py 42 alice` with HUB_REDIS_URL set reaches alice and the ops room on a real node."""
    redis_server = RedisServer()
    redis_server.start()  # its own Redis: the example uses the default prefix "hub:"
    node = NodeProcess("--redis-url", redis_server.url, "--node-id", "example").start()
    try:
        alice = await Client.open(session, node.ws_url + "?user_id=alice")
        operator = await Client.open(session, node.ws_url + "?user_id=op")
        await operator.join("ops")
        copy_example("worker.py", tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")} | {"HUB_REDIS_URL": redis_server.url}
        ran = subprocess.run([str(worker_venv / "bin" / "python"), "examples/worker.py", "42", "alice"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "1 node(s) took it"
        got = await alice.recv_type("order_shipped")
        assert got["data"] == {"order": 42} and got["metadata"] == {"source": "worker"} and "user_id" not in got
        got = await operator.recv_type("order_shipped")
        assert got["room"] == "ops" and got["data"] == {"order": 42}
    finally:
        node.stop()
        redis_server.stop()


def test_example_worker_test_runs_as_written(tmp_path: Path) -> None:
    """`cd examples && pytest test_worker.py`: the worker's test, with RecordingPublisher, passes."""
    copy_example("worker.py", tmp_path)
    copy_example("test_worker.py", tmp_path)
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_worker.py"],
                         cwd=tmp_path / "examples", capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "1 passed" in ran.stdout, ran.stdout + ran.stderr
