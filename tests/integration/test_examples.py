"""examples/app.py runs as its docstring says: a real process, tokens from its own login route.

The app mounts the hub at /ws with `--auth jwt` next to its own routes (login, announce, stats).
examples/worker.py and examples/test_worker.py are run by tests/integration/test_packaging.py
(the worker from a fresh venv holding only the wheel, its test with pytest next to it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.helpers import ROOT, Client, Loopback, NodeProcess, free_port, wait_until, wait_until_sync

SECRET = "example-secret-of-at-least-32-bytes!"


@dataclass
class App(Loopback):
    port: int
    log: Path


def _serves(url: str, proc: subprocess.Popen[bytes]) -> bool:
    import urllib.request

    if proc.poll() is not None:
        return True  # exited: the caller reports it
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """`.venv/bin/python examples/app.py` from the repository, on a free port (HUB_PORT), alone (no Redis)."""
    port = free_port()
    log = tmp_path_factory.mktemp("example-app") / "app.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env |= {"HUB_PORT": str(port), "HUB_JWT_SECRET": SECRET, "PYTHONDONTWRITEBYTECODE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "examples/app.py"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until_sync(lambda: _serves(f"http://127.0.0.1:{port}/stats", proc), 20, "examples/app.py to serve")
        assert proc.poll() is None, log.read_text()
        yield App(port, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, log.read_text()  # the node drained and the app stopped cleanly


async def login(session: aiohttp.ClientSession, app: App, user: Any) -> aiohttp.ClientResponse:
    return await session.post(f"{app.url}/login", json={"user": user})


async def token_for(session: aiohttp.ClientSession, app: App, user: str) -> str:
    resp = await login(session, app, user)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["user"] == user and body["expires_in"] == 3600
    return str(body["token"])


async def announce(session: aiohttp.ClientSession, app: App, room: str, token: str | None,
                   body: Any) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await session.post(f"{app.url}/rooms/{room}/announce", json=body, headers=headers)


async def test_login_token_connects_as_its_subject_and_announce_reaches_the_room(
        app: App, session: aiohttp.ClientSession) -> None:
    """A token from /login opens /ws as its `sub`; /rooms/<room>/announce reaches the room's members."""
    alice_token = await token_for(session, app, "alice")
    claims = jwt.decode(alice_token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - time.time() > 3500
    alice = await Client.open(session, f"{app.ws_url}?token={alice_token}")
    assert alice.connected["user_id"] == "alice"
    await alice.join("lobby")
    bob_token = await token_for(session, app, "bob")  # Authorization: Bearer works at /ws too
    bob = await Client.open(session, app.ws_url, headers={"Authorization": f"Bearer {bob_token}"})
    assert bob.connected["user_id"] == "bob"
    resp = await announce(session, app, "lobby", bob_token, {"text": "hello lobby"})
    assert resp.status == 200 and await resp.json() == {"nodes": 1}
    got = await alice.recv_type("announcement")
    assert got["room"] == "lobby" and got["user_id"] == "bob" and got["data"] == {"text": "hello lobby"}
    await bob.expect_silence()  # not a member of the lobby
    await alice.close()
    await bob.close()


async def test_bad_tokens_are_refused_at_ws_and_announce(app: App, session: aiohttp.ClientSession) -> None:
    """A token signed with another secret, an expired one, or none: 401 before the upgrade and at announce."""
    now = int(time.time())
    forged = jwt.encode({"sub": "mallory", "exp": now + 60}, "another-secret-of-at-least-32-bytes", "HS256")
    expired = jwt.encode({"sub": "alice", "exp": now - 60}, SECRET, "HS256")
    for query in (f"?token={forged}", f"?token={expired}", "?user_id=alice", ""):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(app.ws_url + query)
        assert refused.value.status == 401, query
    for token in (forged, expired, None):
        resp = await announce(session, app, "lobby", token, {"text": "spoofed"})
        assert resp.status == 401, await resp.text()


async def test_browsers_connect_from_the_apps_own_origin_only(app: App, session: aiohttp.ClientSession) -> None:
    """The default HUB_ALLOWED_ORIGINS: the app's own origins pass, any other gets 403."""
    token = await token_for(session, app, "carol")
    for origin in (f"http://127.0.0.1:{app.port}", f"http://localhost:{app.port}"):
        client = await Client.open(session, f"{app.ws_url}?token={token}", origin=origin)
        await client.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{app.ws_url}?token={token}", origin="https://evil.example")
    assert refused.value.status == 403


async def test_app_routes_answer_and_refuse_bad_input(app: App, session: aiohttp.ClientSession) -> None:
    """/stats counts the hub's clients and rooms; /login and announce refuse bad names and bodies with 400."""
    token = await token_for(session, app, "dave")
    dave = await Client.open(session, f"{app.ws_url}?token={token}")
    await dave.join("kitchen")
    resp = await session.get(f"{app.url}/stats")
    assert resp.status == 200
    stats = await resp.json()
    assert stats["clients"] >= 1 and stats["rooms"].get("kitchen") == 1, stats
    for user in ("has space", "", None, 7):
        resp = await login(session, app, user)
        assert resp.status == 400 and "user" in (await resp.json())["error"], user
    resp = await session.post(f"{app.url}/login", data=b"not json")
    assert resp.status == 400
    resp = await announce(session, app, "r" * 129, token, {"text": "x"})  # room names: 1-128 characters
    assert resp.status == 400 and "128" in (await resp.json())["error"]
    resp = await announce(session, app, "kitchen", token, {"message": "no text"})
    assert resp.status == 400
    resp = await announce(session, app, "kitchen", token, {"text": "soup"})
    assert resp.status == 200 and await resp.json() == {"nodes": 1}
    got = await dave.recv_type("announcement")
    assert got["room"] == "kitchen" and got["user_id"] == "dave" and got["data"] == {"text": "soup"}
    await dave.close()


async def test_bot_answers_in_its_room_and_comes_back_after_its_node_restarts(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """examples/bot.py as its first line says, against a real node: !ping, !who, and again after a restart."""
    node = NodeProcess("--rate", "0").start()
    log = tmp_path / "bot.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")} | {"HUB_URL": node.ws_url}
    with log.open("wb") as out:
        bot = subprocess.Popen([sys.executable, "examples/bot.py"], cwd=ROOT, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        wait_until_sync(lambda: "bot joined lobby" in log.read_text() or bot.poll() is not None, 20,
                        "the bot to join the lobby")
        assert bot.poll() is None, log.read_text()
        for _ in range(2):
            tester = await Client.open(session, node.ws_url + "?user_id=tester")
            await tester.join("lobby")
            # as the demo chat sends it, and as plain text
            await tester.send({"type": "room_message", "data": {"room": "lobby",
                                                                 "message": {"text": "!ping", "node": "x"}}})
            assert await _reply_from_bot(tester) == {"text": "pong"}
            await tester.send({"type": "room_message", "data": {"room": "lobby", "message": "!who"}})
            assert await _reply_from_bot(tester) == {"text": "here: bot, tester"}
            await tester.close()
            node.stop()  # the bot reconnects with backoff and re-joins the lobby by itself
            node.start()
            await wait_until(lambda: "lobby" in _rooms(node), 20, what="the bot to re-join the lobby")
        assert bot.poll() is None, log.read_text()
    finally:
        bot.kill()
        bot.wait()
        node.stop()


async def _reply_from_bot(client: Client) -> Any:
    while True:
        got = await client.recv_type("room_message")
        if got.get("user_id") == "bot":
            return got["data"]["message"]


def _rooms(node: NodeProcess) -> dict[str, Any]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{node.url}/api/rooms", timeout=2) as resp:
        return dict(json.load(resp)["rooms"])
