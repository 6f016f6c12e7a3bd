"""The HTTP API of docs/http-api.md on a single node."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import node_config, start_server
from tests.helpers import Client, NodeProcess, RedisServer

JSON = {"Content-Type": "application/json"}


async def _client(session: aiohttp.ClientSession, hub: TestServer, user: str) -> Client:
    return await Client.open(session, str(hub.make_url("/ws")) + f"?user_id={user}")


async def test_post_broadcast_targets(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """room set -> that room; else user_id -> that user; else everybody. 202 {"ok": true}."""
    a, b = await _client(session, hub, "a"), await _client(session, hub, "b")
    await a.join("r")
    resp = await session.post(hub.make_url("/broadcast"), json={"type": "n", "data": 1, "room": "r"})
    assert resp.status == 202 and await resp.json() == {"ok": True}
    assert (await a.recv_type("n"))["room"] == "r"
    await b.expect_silence()
    await session.post(hub.make_url("/broadcast"), json={"type": "n", "data": 2, "user_id": "b"})
    got = await b.recv_type("n")
    assert got["data"] == 2 and "user_id" not in got  # it named the recipient: b is not its own sender
    await a.expect_silence()
    await session.post(hub.make_url("/broadcast"), json={"type": "n", "data": 3, "metadata": {"k": "v"}})
    for c in (a, b):
        got = await c.recv_type("n")
        assert got["data"] == 3 and got["metadata"] == {"k": "v"}


async def test_post_broadcast_to_names_the_recipient(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """`to` targets a user unambiguously; a server-sent message has no sender unless the caller names one."""
    a, b = await _client(session, hub, "a"), await _client(session, hub, "b")
    resp = await session.post(hub.make_url("/broadcast"), json={"type": "n", "data": 1, "to": "b"})
    assert resp.status == 202
    got = await b.recv_type("n")
    assert got["data"] == 1 and "user_id" not in got and "to" not in got
    await a.expect_silence()
    await session.post(hub.make_url("/broadcast"), json={"type": "n", "data": 2, "to": "a", "user_id": "support"})
    got = await a.recv_type("n")
    assert got["data"] == 2 and got["user_id"] == "support"  # with `to`, user_id is the sender again
    await b.expect_silence()
    resp = await session.post(hub.make_url("/broadcast"), json={"type": "n", "to": "a", "room": "r"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "bad_message" and "not both" in error["message"]


@pytest.mark.parametrize(("body", "code"), [
    (b"nope", "bad_json"), (b'{"data": 1}', "bad_message"), (b'[1]', "bad_message"),
    (b'{"type": "t", "room": "a b"}', "bad_room"), (b'{"type": "t", "user_id": ""}', "bad_message"),
    (b'{"type": "ack", "id": 1}', "bad_message"), (b'{"type": "error"}', "bad_message"),
    (b'{"type": "t", "to": "a b"}', "bad_message"), (b'{"type": "t", "to": 7}', "bad_message"),
    (b'{"type": "t", "data": ' + b"[" * 300 + b"]" * 300 + b"}", "bad_message"),
])
async def test_post_broadcast_bad_input_400(hub: TestServer, session: aiohttp.ClientSession,
                                            body: bytes, code: str) -> None:
    """Bad bodies get 400 with a JSON error naming the problem."""
    resp = await session.post(hub.make_url("/broadcast"), data=body, headers=JSON)
    assert resp.status == 400
    err = await resp.json()
    assert err["ok"] is False and err["error"]["code"] == code and err["error"]["message"]


async def test_post_broadcast_needs_json_content_type(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A form or text/plain body gets 415, so a web page cannot forge broadcasts without CORS."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        resp = await session.post(hub.make_url("/broadcast"), data=b'{"type": "t"}',
                                  headers={"Content-Type": content_type})
        assert resp.status == 415


async def test_stats_rooms_and_members(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """/api/stats, /api/rooms and /api/rooms/<room> describe the node's clients."""
    a, b = await _client(session, hub, "a"), await _client(session, hub, "b")
    await a.join("r1")
    await b.join("r1")
    await b.join("r2")
    assert await (await session.get(hub.make_url("/api/stats"))).json() == {"clients": 2, "rooms": 2, "nodes": 1}
    assert await (await session.get(hub.make_url("/api/rooms"))).json() == {"rooms": {"r1": 2, "r2": 1}}
    room = await (await session.get(hub.make_url("/api/rooms/r1"))).json()
    assert room["room"] == "r1"
    assert sorted((m["conn_id"], m["user_id"], m["node"]) for m in room["members"]) == sorted(
        [(a.conn_id, "a", "n1"), (b.conn_id, "b", "n1")])
    empty = await (await session.get(hub.make_url("/api/rooms/none"))).json()
    assert empty == {"room": "none", "members": []}


async def test_health_and_readiness(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """/healthz is 200 while serving; /readyz is 200 when the broker is up."""
    assert (await session.get(hub.make_url("/healthz"))).status == 200
    assert (await session.get(hub.make_url("/readyz"))).status == 200


async def test_api_key_guards_api(session: aiohttp.ClientSession) -> None:
    """With --api-key, /broadcast and /api/* need the Bearer key; health stays open."""
    server = await start_server(node_config(api_key=("s3cret", "other")))
    try:
        url = server.make_url
        assert (await session.get(url("/api/stats"))).status == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await session.post(url("/broadcast"), json={"type": "t"}, headers=bad)).status == 401
        good = {"Authorization": "Bearer other"}
        assert (await session.get(url("/api/stats"), headers=good)).status == 200
        assert (await session.post(url("/broadcast"), json={"type": "t"}, headers=good)).status == 202
        assert (await session.get(url("/healthz"))).status == 200
    finally:
        await server.close()


async def test_origin_check_at_handshake(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A browser Origin other than localhost is refused with 403 by default on loopback."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session.ws_connect(hub.make_url("/ws"), headers={"Origin": "http://evil.example"})
    assert err.value.status == 403
    ok = await session.ws_connect(hub.make_url("/ws"), headers={"Origin": "http://localhost:3000"})
    await ok.close()


async def test_max_connections_503(session: aiohttp.ClientSession) -> None:
    """Over --max-connections the handshake gets 503."""
    server = await start_server(node_config(max_connections=1))
    try:
        first = await Client.open(session, str(server.make_url("/ws")))
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(server.make_url("/ws"))
        assert err.value.status == 503
        await first.close()
    finally:
        await server.close()


async def test_demo_page_and_client_served(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """/ serves the demo page and /hub.js the browser client."""
    page = await session.get(hub.make_url("/"))
    assert page.status == 200 and "hub.js" in await page.text()
    js = await session.get(hub.make_url("/hub.js"))
    assert js.status == 200 and "class HubClient" in await js.text()


async def test_reads_answer_503_with_the_error_body_while_redis_is_down(session: aiohttp.ClientSession) -> None:
    """Issue 17 (found writing docs/http-api.md): the reads failed with a plain-text 500 and a traceback."""
    redis_server = RedisServer()
    redis_server.start()
    node = NodeProcess("--redis-url", redis_server.url, "--redis-timeout", "1").start()
    try:
        async with session.get(node.url + "/api/stats") as resp:
            assert resp.status == 200
        redis_server.stop()
        for path in ("/api/stats", "/api/rooms", "/api/rooms/lobby", "/api/rooms/lobby/presence", "/api/nodes",
                     "/api/cluster/metrics"):
            async with session.get(node.url + path) as resp:
                body = await resp.json()
                assert resp.status == 503 and body["ok"] is False, (path, body)
                assert body["error"]["code"] == "unavailable" and "cannot" in body["error"]["message"], (path, body)
        async with session.get(node.url + "/api/metrics") as resp:  # this node's own counters: no Redis needed
            assert resp.status == 200
        assert "Traceback" not in node.output()
    finally:
        node.stop()
        redis_server.stop()
