"""The client protocol end to end over a real aiohttp server (embedded broker)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import node_config, start_server
from tests.helpers import Client, wait_until


def ws_url(server: TestServer, query: str = "") -> str:
    return str(server.make_url("/ws")) + (f"?{query}" if query else "")


async def open_client(session: aiohttp.ClientSession, server: TestServer, user: str | None = None) -> Client:
    return await Client.open(session, ws_url(server, f"user_id={user}" if user else ""))


async def test_connected_frame_first(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """The first frame is `connected` with conn_id, user_id and node."""
    alice = await open_client(session, hub, "alice")
    assert alice.connected["user_id"] == "alice" and alice.connected["node"] == "n1"
    assert alice.conn_id.startswith("n1:")
    anon = await open_client(session, hub)
    assert anon.connected["user_id"] is None


@pytest.mark.parametrize("query", ["user_id=", "user_id=a%20b", "user_id=" + "x" * 129])
async def test_invalid_user_id_is_400(hub: TestServer, session: aiohttp.ClientSession, query: str) -> None:
    """An empty or invalid user_id is refused with 400 before the upgrade."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session.ws_connect(ws_url(hub, query))
    assert err.value.status == 400


async def test_room_message_reaches_members_only(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """Two clients in a room get a room message (sender included); a third outside does not."""
    a, b, c = [await open_client(session, hub, u) for u in ("a", "b", "c")]
    await a.join("r1")
    await b.join("r1")
    await a.send({"type": "room_message", "data": {"room": "r1", "message": "hi"}, "id": 7})
    for client in (a, b):
        got = await client.recv_type("room_message")
        assert got["room"] == "r1" and got["user_id"] == "a" and got["data"] == {"room": "r1", "message": "hi"}
        assert isinstance(got["timestamp"], int)
    await c.expect_silence()


async def test_ack_once_per_id(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A frame with an id gets exactly one ack; without an id success is silent."""
    a = await open_client(session, hub, "a")
    await a.send({"type": "join_room", "data": "r"})
    await a.send({"type": "join_room", "data": "r", "id": 5})
    assert await a.recv() == {"type": "ack", "id": 5}
    await a.expect_silence()


async def test_leave_room_stops_delivery(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """After leave_room the client no longer receives the room; leaving twice is fine."""
    a, b = await open_client(session, hub, "a"), await open_client(session, hub, "b")
    await a.join("r")
    await b.join("r")
    assert (await b.request("leave_room", "r", 2))["type"] == "ack"
    assert (await b.request("leave_room", "r", 3))["type"] == "ack"
    await a.send({"type": "room_message", "data": {"room": "r", "message": 1}})
    await a.recv_type("room_message")
    await b.expect_silence()


async def test_broadcast_reaches_everyone(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A client broadcast reaches every connection, sender included, with the sender's user_id."""
    clients = [await open_client(session, hub, u) for u in ("a", "b")] + [await open_client(session, hub)]
    await clients[2].send({"type": "broadcast", "data": {"x": 1}})
    for client in clients:
        got = await client.recv_type("broadcast")
        assert got["data"] == {"x": 1} and "user_id" not in got  # anonymous sender: omitted


async def test_private_message_to_every_connection_of_user(hub: TestServer,
                                                           session: aiohttp.ClientSession) -> None:
    """A private message reaches all of the target user's connections and no one else."""
    b1, b2 = await open_client(session, hub, "bob"), await open_client(session, hub, "bob")
    a, c = await open_client(session, hub, "alice"), await open_client(session, hub, "carol")
    assert (await a.request("private_message", {"user_id": "bob", "message": "psst"}, 1))["type"] == "ack"
    for bob in (b1, b2):
        got = await bob.recv_type("private_message")
        assert got["user_id"] == "alice" and got["data"] == {"to": "bob", "message": "psst"}
    await c.expect_silence()
    await a.expect_silence()


async def test_ping_pong_carries_id(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """ping is answered by pong with the same data and id, and no separate ack."""
    a = await open_client(session, hub, "a")
    pong = await a.request("ping", {"n": 1}, "p1")
    assert pong["type"] == "pong" and pong["data"] == {"n": 1} and pong["id"] == "p1"
    await a.expect_silence()


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "bad_json"),
    ('{"type": 1, "id": 1}', "bad_message"),
    ('{"type": "zap", "id": 1}', "unknown_type"),
    ('{"type": "join_room", "data": "a b", "id": 1}', "bad_room"),
    ('{"type": "room_message", "data": {"room": "r", "message": 1}, "id": 1}', "not_in_room"),
    ('{"type": "private_message", "data": {"user_id": "", "message": 1}, "id": 1}', "bad_message"),
])
async def test_error_codes_leave_connection_open(hub: TestServer, session: aiohttp.ClientSession,
                                                 frame: str, code: str) -> None:
    """Each bad frame gets its error code and the connection keeps working."""
    a = await open_client(session, hub, "a")
    await a.ws.send_str(frame)
    err = await a.recv_type("error")
    assert err["data"]["code"] == code and err["data"]["message"]
    assert (await a.request("ping", None, "after"))["type"] == "pong"


async def test_too_many_rooms(session: aiohttp.ClientSession) -> None:
    """--max-rooms-per-conn refuses the next join with too_many_rooms; rejoining is fine."""
    server = await start_server(node_config(max_rooms_per_conn=2))
    try:
        a = await open_client(session, server, "a")
        await a.join("r1", 1)
        await a.join("r2", 2)
        assert (await a.request("join_room", "r3", 3))["data"]["code"] == "too_many_rooms"
        await a.join("r1", 4)
    finally:
        await server.close()


async def test_forbidden_when_broadcast_disabled(session: aiohttp.ClientSession) -> None:
    """With client broadcast off, a broadcast gets forbidden and reaches nobody."""
    server = await start_server(node_config(client_broadcast=False, client_private=False))
    try:
        a, b = await open_client(session, server, "a"), await open_client(session, server, "b")
        assert (await a.request("broadcast", 1, 1))["data"]["code"] == "forbidden"
        reply = await a.request("private_message", {"user_id": "b", "message": 1}, 2)
        assert reply["data"]["code"] == "forbidden"
        await b.expect_silence()
    finally:
        await server.close()


async def test_rate_limited(session: aiohttp.ClientSession) -> None:
    """Past the burst, frames get rate_limited and have no effect."""
    server = await start_server(node_config(rate=0.001, burst=3, max_errors=100))
    try:
        a = await open_client(session, server, "a")
        for i in range(3):
            assert (await a.request("join_room", f"r{i}", i))["type"] == "ack"
        reply = await a.request("join_room", "r9", 9)
        assert reply["type"] == "error" and reply["data"]["code"] == "rate_limited"
        rooms = await (await session.get(server.make_url("/api/rooms"))).json()
        assert "r9" not in rooms["rooms"]
    finally:
        await server.close()


async def test_unavailable_when_broker_down(session: aiohttp.ClientSession) -> None:
    """With the broker unreachable, publishes get `unavailable` and the socket stays open."""
    from hubnode.app import NODE

    server = await start_server(node_config())
    try:
        a = await open_client(session, server, "a")
        broker = server.app[NODE].broker
        broker._closed = True  # type: ignore[attr-defined]  # the memory broker's "down" switch
        reply = await a.request("broadcast", 1, 1)
        assert reply["data"]["code"] == "unavailable"
        resp = await session.post(server.make_url("/broadcast"), json={"type": "t"})
        assert resp.status == 503
        assert (await session.get(server.make_url("/readyz"))).status == 503
        broker._closed = False  # type: ignore[attr-defined]
        assert (await a.request("ping", None, 2))["type"] == "pong"
    finally:
        await server.close()


async def test_too_many_errors_close_1008(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """More than 10 errors in a row close the connection with 1008."""
    a = await open_client(session, hub, "a")
    for _ in range(11):
        await a.ws.send_str("{")
    assert await a.closed_with() == 1008


async def test_binary_frame_closes_1003(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A binary frame closes the connection with 1003."""
    a = await open_client(session, hub, "a")
    await a.ws.send_bytes(b"\x00\x01")
    assert await a.closed_with() == 1003


async def test_oversized_frame_closes_1009(session: aiohttp.ClientSession) -> None:
    """A frame over --max-message-bytes closes with 1009; other clients are unaffected."""
    server = await start_server(node_config(max_message_bytes=1024))
    try:
        a, b = await open_client(session, server, "a"), await open_client(session, server, "b")
        await a.ws.send_str('{"type":"ping","data":"' + "x" * 2000 + '"}')
        assert await a.closed_with() == 1009
        assert (await b.request("ping", 1, 1))["type"] == "pong"
    finally:
        await server.close()


async def test_disconnect_leaves_rooms_and_empty_rooms_vanish(hub: TestServer,
                                                             session: aiohttp.ClientSession) -> None:
    """A closed client leaves every room; a room with no members disappears from the API."""
    a, b = await open_client(session, hub, "a"), await open_client(session, hub, "b")
    await a.join("solo")
    await a.join("shared")
    await b.join("shared")
    await a.close()

    async def rooms() -> dict[str, int]:
        return (await (await session.get(hub.make_url("/api/rooms"))).json())["rooms"]  # type: ignore[no-any-return]

    await wait_until(lambda: _eq(rooms(), {"shared": 1}), what="rooms to settle")


async def _eq(coro: object, expected: object) -> bool:
    return await coro == expected  # type: ignore[misc]
