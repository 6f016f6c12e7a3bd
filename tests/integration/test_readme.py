"""The README is short and true: at most 250 lines with the two commands, and its Python examples
(the app mounting the hub, the bot, the worker's task) run as written against real nodes.

Issue 17: the README had grown to 1,678 lines mixing a tutorial, a reference and operations; the
reference is now docs/, checked by its own tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, Client, NodeProcess, RedisServer, doc_block, free_port, wait_until, wait_until_sync

README = (ROOT / "README.md").read_text()


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    assert len(README.splitlines()) <= 250
    assert "make run " in README and "make test " in README and "http://127.0.0.1:8080" in README
    for section in ("## Two commands on a fresh machine", "## A five-minute tour", "## Guarantees",
                    "## Documentation"):
        assert section in README


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}


@pytest.fixture
def run(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Programs a test starts; interrupted (and killed if need be) at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(run: list[subprocess.Popen[bytes]], folder: Path, name: str, source: str,
          env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    (folder / name).write_text(source)
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, name], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    run.append(proc)
    return proc, log


async def test_the_app_example_serves_the_hub_beside_its_route(
        tmp_path: Path, run: list[subprocess.Popen[bytes]], clean_env: dict[str, str],
        session: aiohttp.ClientSession) -> None:
    port = free_port()
    source = doc_block("README.md", "# app.py")
    assert source.count("8081") == 4  # the comment, Config and run_app: only the port changes
    proc, log = start(run, tmp_path, "app.py", source.replace("8081", str(port)), clean_env)
    wait_until_sync(lambda: _answers(port) or proc.poll() is not None, 20, "app.py to serve")
    assert proc.poll() is None, log.read_text()
    alice = await Client.open(session, f"ws://127.0.0.1:{port}/ws?user_id=alice")
    await alice.join("lobby")
    async with session.post(f"http://127.0.0.1:{port}/notify") as resp:
        assert resp.status == 200 and await resp.json() == {"nodes": 1}
    got = await alice.recv_type("notification")
    assert got["data"] == "hello lobby" and got["room"] == "lobby"
    await alice.close()


async def test_the_bot_example_answers_ping(tmp_path: Path, run: list[subprocess.Popen[bytes]],
                                            clean_env: dict[str, str], session: aiohttp.ClientSession) -> None:
    node = NodeProcess("--rate", "0").start()
    try:
        source = doc_block("README.md", "# bot.py")
        assert len(source.splitlines()) <= 15 and source.count("ws://127.0.0.1:8080/ws") == 1
        proc, log = start(run, tmp_path, "bot.py", source.replace("ws://127.0.0.1:8080/ws", node.ws_url),
                          clean_env)
        tester = await Client.open(session, node.ws_url + "?user_id=tester")
        await tester.join("lobby")

        async def bot_in_lobby() -> bool:
            assert proc.poll() is None, log.read_text()
            return (await tester.request("presence", "lobby"))["data"]["users"].get("bot") == 1

        await wait_until(bot_in_lobby, 20, what="the bot to join the lobby")
        await tester.send({"type": "room_message", "data": {"room": "lobby", "message": "!ping"}})
        while (got := await tester.recv_type("room_message"))["user_id"] != "bot":
            pass
        assert got["data"]["message"] == {"text": "pong"}
        await tester.close()
    finally:
        node.stop()


async def test_the_worker_task_reaches_the_user(tmp_path: Path, clean_env: dict[str, str],
                                                session: aiohttp.ClientSession) -> None:
    """The task module, imported from a script as Celery would, with HUB_REDIS_URL pointing at the nodes' Redis."""
    redis_server = RedisServer()
    redis_server.start()
    node = NodeProcess("--redis-url", redis_server.url).start()  # the default prefix, as the task uses
    try:
        (tmp_path / "tasks.py").write_text(doc_block("README.md", "# tasks.py"))
        customer = await Client.open(session, node.ws_url + "?user_id=alice")
        ran = subprocess.run([sys.executable, "-c", "import tasks; print(tasks.order_shipped(42, 'alice'))"],
                             cwd=tmp_path, env=clean_env | {"HUB_REDIS_URL": redis_server.url},
                             capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0 and ran.stdout.strip() == "1", ran.stderr
        got = await customer.recv_type("order_shipped")
        assert got["data"] == {"order": 42}
        await customer.close()
    finally:
        node.stop()
        redis_server.stop()


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
