"""The documentation says what it shows: docs/python.md's Hub API example runs as written,
docs/protocol.md's table of server frames names exactly the fields the frames have, and
docs/configuration.md's console session of bad configuration is what the commands print.

Issue 12: `python app.py` failed outside the venv and its cluster hint silently
ran alone; the README promised `timestamp` on every frame while acks have none.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestServer

from hubnode.appkey import NODE
from tests.conftest import node_config, start_server
from tests.helpers import ROOT, SCALE, Client, RedisServer, doc_block, free_port, wait_until, wait_until_sync


async def test_python_api_app_runs_as_written_and_joins_the_cluster(tmp_path: Path,
                                                                 session: aiohttp.ClientSession) -> None:
    """`.venv/bin/python app.py` with HUB_REDIS_URL: a node registered in that Redis, /notify reaches the lobby.

    Only the port changes (8081 may be taken on a test machine).
    """
    port = free_port()
    source = doc_block("docs/python.md", "# app.py")
    assert source.count("8081") == 4  # the comments, Config and run_app: all move together
    (tmp_path / "app.py").write_text(source.replace("8081", str(port)))
    redis_server = RedisServer()
    redis_server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")} | {"HUB_REDIS_URL": redis_server.url}
    log = tmp_path / "app.log"
    with log.open("wb") as out:
        app = subprocess.Popen([sys.executable, "app.py"], cwd=tmp_path, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        wait_until_sync(lambda: _answers(f"http://127.0.0.1:{port}/healthz") or app.poll() is not None, 20,
                        "app.py to serve")
        assert app.poll() is None, log.read_text()
        alice = await Client.open(session, f"ws://127.0.0.1:{port}/ws?user_id=alice")
        await alice.join("lobby")
        with redis.Redis.from_url(redis_server.url) as r:
            await wait_until(lambda: r.zcard("hub:nodes") == 1, what="the app's node to register in Redis")
        resp = await session.post(f"http://127.0.0.1:{port}/notify")
        assert resp.status == 200 and await resp.json() == {"nodes": 1, "clients": 1}
        got = await alice.recv_type("notification")
        assert got["data"] == "hello lobby" and got["room"] == "lobby"
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(15)
        finally:
            if app.poll() is None:
                app.kill()
            redis_server.stop()


async def _open(session: aiohttp.ClientSession, url: str, seen: list[tuple[str, dict[str, Any]]]) -> Client:
    """A Client, keeping its whole `connected` frame (Client.open keeps only its data)."""
    ws = await session.ws_connect(url)
    first = await ws.receive_json(timeout=5 * SCALE)
    seen.append(("connected", first))
    client = Client(ws)
    client.connected = first["data"]
    return client


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except OSError:
        return False


def frame_table() -> dict[str, tuple[set[str], set[str]]]:
    """docs/protocol.md's "server frame | always | only when" table: frame -> (always, optional) fields."""
    text = (ROOT / "docs/protocol.md").read_text()
    table = text[text.index("| server frame | always | only when |"):]
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        frame, always, when = (cell.strip() for cell in line.strip("|").split("|"))
        name = re.match(r"`(\w+)`", frame)
        key = name[1] if name else "published"
        optional = set(re.findall(r"`(\w+)`:", when))
        rows[key] = (set(re.findall(r"`(\w+)`", always)), optional)
    return rows


@pytest.mark.parametrize("history", [0, 10], ids=["no-history", "history"])
async def test_protocol_frame_table_matches_the_frames(session: aiohttp.ClientSession, history: int) -> None:
    """Every kind of frame a client can get, with and without its optional fields, against the table.

    Twice: without history, and with it (positions on messages, acks and `connected`). The lobby announces
    presence; server-side control adds the `joined`, `left` and `disconnect` notices and a refused join's error.
    """
    table = frame_table()
    assert set(table) == {"connected", "ack", "error", "pong", "presence", "room_message", "private_message",
                          "broadcast", "system_message", "published"}
    server: TestServer = await start_server(node_config(history_size=history, presence_rooms=("lobby",),
                                                        max_rooms_per_conn=2))
    node = server.app[NODE]
    seen: list[tuple[str, dict[str, Any]]] = []
    try:
        url = str(server.make_url("/ws"))
        alice, anon = await _open(session, url + "?user_id=alice", seen), await _open(session, url, seen)
        for client in (alice, anon):
            seen.append(("ack", await client.request("join_room", "lobby", fid=1)))
        await alice.send({"type": "room_message", "data": "not an object", "id": 2})
        seen.append(("error", await alice.recv_type("error")))
        await alice.send({"type": "no_such_type"})
        seen.append(("error", await alice.recv_type("error")))
        await alice.send({"type": "ping", "data": 1, "id": "p"})
        seen.append(("pong", await alice.recv_type("pong")))
        await alice.send({"type": "ping", "data": 2})
        seen.append(("pong", await alice.recv_type("pong")))
        await alice.send({"type": "presence", "data": "lobby", "id": 3})
        await alice.send({"type": "presence", "data": "lobby"})
        bob = await _open(session, url + "?user_id=bob", seen)
        await bob.join("lobby")  # alice is told: a presence event
        presence: list[dict[str, Any]] = []
        while not ({3, None} <= {p.get("id") for p in presence if "users" in p["data"]}
                   and {"event": "join", "user_id": "bob"} in [p["data"] for p in presence]):
            presence.append(await alice.recv_type("presence"))
        seen.extend(("presence", p) for p in presence)
        for sender in (alice, anon):
            await sender.send({"type": "room_message", "data": {"room": "lobby", "message": "hi"}})
            seen.append(("room_message", await alice.recv_type("room_message")))
            await sender.send({"type": "private_message", "data": {"user_id": "alice", "message": "psst"}})
            seen.append(("private_message", await alice.recv_type("private_message")))
            await sender.send({"type": "broadcast", "data": {"x": 1}})
            seen.append(("broadcast", await alice.recv_type("broadcast")))
        for body in ({"type": "news", "data": 1}, {"type": "news", "room": "lobby", "metadata": {"k": 1}, "id": 7},
                     {"type": "news", "to": "alice", "user_id": "support"}, {"type": "news", "user_id": "alice"}):
            async with session.post(server.make_url("/broadcast"), json=body) as posted:  # released at once
                assert posted.status == 202
            seen.append(("published", await alice.recv_type("news")))
        assert await node.join_user("alice", "vip") == 1
        seen.append(("system_message", await alice.recv_type("system_message")))
        assert await node.join_user("alice", "full") == 1  # lobby and vip: at --max-rooms-per-conn 2
        seen.append(("error", refused := await alice.recv_type("error")))
        assert refused["data"]["code"] == "too_many_rooms" and refused["data"]["room"] == "full"
        assert await node.leave_user("alice", "vip") == 1
        seen.append(("system_message", await alice.recv_type("system_message")))
        assert await node.disconnect_connection(anon.conn_id, reason="bye", reconnect=True) == 1
        seen.append(("system_message", await anon.recv_type("system_message")))
        assert await anon.closed_with() == 4001
        drain = asyncio.ensure_future(server.close())  # drains: system_message reconnect, then close 1001
        seen.append(("system_message", await alice.recv_type("system_message")))
        assert [await alice.closed_with(), await bob.closed_with()] == [1001, 1001]  # answered: the drain ends
        await drain
        for client in (alice, anon, bob):  # release them, or the GC warns later
            await client.close()
    finally:
        await server.close()
    for kind, frame in seen:
        always, optional = table[kind]
        keys = set(frame)
        assert always <= keys <= always | optional, (kind, frame, always, optional)
    events = [frame["data"]["event"] for kind, frame in seen if kind == "system_message"]
    assert events == ["joined", "left", "disconnect", "reconnect"]
    assert ("presence", {"type", "room", "data"}) in [(kind, set(frame)) for kind, frame in seen]  # no id asked
    with_optional = {(kind, key) for kind, frame in seen for key in frame if key in table[kind][1]}
    assert with_optional >= {("error", "id"), ("pong", "id"), ("presence", "id"), ("presence", "timestamp"),
                             ("room_message", "user_id"), ("published", "room"), ("published", "user_id"),
                             ("published", "metadata"), ("published", "id")}
    positioned = {("ack", "data"), ("room_message", "offset"), ("room_message", "epoch"),
                  ("private_message", "offset"), ("published", "offset"), ("published", "epoch")}
    assert (with_optional >= positioned) if history else not (with_optional & positioned)


def test_configuration_errors_are_what_the_commands_print() -> None:
    """docs/configuration.md's console session of bad configuration, run in a shell: the same line, exit 2."""
    text = (ROOT / "docs/configuration.md").read_text()
    session = re.search(r"```console\n(\$ hubnode --port 99999\n.*?)```", text, re.S)
    assert session, "docs/configuration.md's console block of bad configuration is missing"
    lines = session[1].splitlines()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for command, expected in zip(lines[::2], lines[1::2], strict=True):
        assert command.startswith("$ ")
        ran = subprocess.run(command[2:], shell=True, env=env, capture_output=True, text=True, timeout=30)
        assert ran.returncode == 2 and ran.stderr == expected + "\n", (command, ran.stderr)
