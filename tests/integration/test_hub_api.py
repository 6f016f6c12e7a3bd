"""The Hub API for library users, and mounting a hub in an existing aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from hubnode import Node, mount
from hubnode.membership import MemoryMembershipStore
from publisher.control import Command, pack_command
from tests.conftest import node_config
from tests.helpers import Client, RedisServer, wait_until


async def test_mount_in_existing_app_and_hub_api(session: aiohttp.ClientSession) -> None:
    """A Node mounted at any route serves clients; the Hub API publishes and counts."""
    app = web.Application()

    async def hello(_r: web.Request) -> web.Response:
        return web.Response(text="my app")

    app.router.add_get("/", hello)
    node = Node(node_config())
    mount(app, node, path="/realtime")
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url("/realtime"))
        a = await Client.open(session, url + "?user_id=alice")
        b = await Client.open(session, url + "?user_id=bob")
        await node.join_room(a.conn_id, "r")
        await node.join_room(b.conn_id, "r")
        assert await node.client_count() == 2 and await node.room_count() == 1
        assert sorted(m.user_id or "" for m in await node.room_clients("r")) == ["alice", "bob"]
        assert await node.broadcast_to_room("r", {"type": "news", "data": 1}) == 1
        assert (await a.recv_type("news"))["room"] == "r"
        assert (await b.recv_type("news"))["data"] == 1
        await node.broadcast_to_user("bob", {"type": "dm", "data": 2})
        assert (await b.recv_type("dm"))["data"] == 2
        await a.expect_silence()
        await node.broadcast_to_all({"type": "all", "data": 3})
        assert (await a.recv_type("all"))["data"] == 3
        await node.leave_room(a.conn_id, "r")
        assert [m.user_id for m in await node.room_clients("r")] == ["bob"]
        assert await (await session.get(server.make_url("/"))).text() == "my app"
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def mounted(node: Node) -> AsyncIterator[str]:
    """`node` mounted at /ws of a fresh aiohttp app on a free loopback port; yields the WebSocket URL."""
    app = web.Application()
    mount(app, node, path="/ws")
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("/ws"))
    finally:
        await server.close()


async def test_embedded_node_presence_and_control(session: aiohttp.ClientSession) -> None:
    """Without Redis (the embedded default): presence events and answers, and every control command."""
    node = Node(node_config(presence_rooms=("chat-*",), max_rooms_per_conn=2))
    async with mounted(node) as url:
        watcher = await Client.open(session, url + "?user_id=watcher")
        await watcher.join("chat-1")
        alice = await Client.open(session, url + "?user_id=alice")
        await alice.join("chat-1", "a1")
        assert (await watcher.recv_type("presence"))["data"] == {"event": "join", "user_id": "alice"}
        answer = await watcher.request("presence", "chat-1", fid="p")
        assert answer == {"type": "presence", "room": "chat-1", "id": "p",
                          "data": {"users": {"alice": 1, "watcher": 1}, "anonymous": 0}}
        assert (await node.presence("chat-1")).users == {"alice": 1, "watcher": 1}
        assert (await alice.request("presence", "elsewhere", fid="x"))["data"]["code"] == "not_in_room"

        assert await node.join_user("alice", "news") == 1
        assert (await alice.recv_type("system_message"))["data"] == {"event": "joined", "room": "news"}
        await node.broadcast_to_room("news", {"type": "headline", "data": 1})
        assert (await alice.recv_type("headline"))["data"] == 1
        assert await node.join_user("alice", "third") == 1  # over --max-rooms-per-conn 2
        refused = await alice.recv_type("error")
        assert refused["data"]["code"] == "too_many_rooms" and refused["data"]["room"] == "third"
        assert await node.leave_user("alice", "news") == 1
        assert (await alice.recv_type("system_message"))["data"] == {"event": "left", "room": "news"}
        assert "news" not in node.rooms_of(alice.conn_id)

        assert await node.disconnect_user("alice", reason="banned") == 1
        notice = await alice.recv_type("system_message")
        assert notice["data"] == {"event": "disconnect", "reason": "banned", "reconnect": False}
        closed = await alice.ws.receive()
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4000 and closed.extra == "banned"
        assert (await watcher.recv_type("presence"))["data"] == {"event": "leave", "user_id": "alice"}
        assert await node.disconnect_connection(watcher.conn_id, reconnect=True) == 1
        await watcher.recv_type("system_message")
        assert (await watcher.ws.receive()).data == 4001
        assert await node.disconnect_user("nobody") == 0


async def test_a_leave_that_overtakes_a_server_side_join_wins(
        session: aiohttp.ClientSession, redis_server: RedisServer, prefix: str) -> None:
    """A join and a leave of one room delivered back to back (the join still waiting for Redis): the
    connection ends outside the room and is told `left`, never `joined` after it."""
    node = Node(node_config(redis_url=redis_server.url, key_prefix=prefix))
    async with mounted(node) as url:
        alice = await Client.open(session, url + "?user_id=alice")
        channel = node.keys.user_channel("alice")
        for op in ("join", "leave"):
            node.on_message(channel, pack_command(Command(op, user="alice", room="raced"), "pub:test")[1])  # type: ignore[arg-type]
        await wait_until(lambda: not node._updates, timeout=5, what="the join and the leave to finish")
        await alice.send({"type": "ping", "data": "marker", "id": "m"})
        seen = [await alice.recv()]
        while seen[-1]["type"] != "pong":
            seen.append(await alice.recv())
        assert [f["data"] for f in seen[:-1]] == [{"event": "left", "room": "raced"}], seen
        assert "raced" not in node.rooms_of(alice.conn_id)


class GatedStore(MemoryMembershipStore):
    """The embedded store, holding the handshakes of user "late" at the membership step until `gate` opens."""

    def __init__(self) -> None:
        super().__init__("n1")
        self.gate, self.waiting = asyncio.Event(), asyncio.Event()

    async def add_connection(self, conn_id: str, user_id: str | None, limit: int = 0) -> bool | None:
        if user_id == "late":
            self.waiting.set()
            await self.gate.wait()
        return await super().add_connection(conn_id, user_id, limit)


async def test_commands_reach_a_connection_whose_handshake_is_under_way(session: aiohttp.ClientSession) -> None:
    """A ban issued while a tab of the user is connecting still closes that tab (4000) once it is live: a command
    acts on every connection the node has when it arrives; a tab that connects after it is not touched."""
    store = GatedStore()
    node = Node(node_config(), store=store)
    async with mounted(node) as url:
        opening = asyncio.ensure_future(Client.open(session, url + "?user_id=late"))
        await asyncio.wait_for(store.waiting.wait(), 5)
        assert await node.disconnect_user("late", reason="banned") == 1
        store.gate.set()
        late = await asyncio.wait_for(opening, 5)
        assert (await late.recv_type("system_message"))["data"] == {"event": "disconnect", "reason": "banned",
                                                                      "reconnect": False}
        closed = await late.ws.receive()
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4000
        after = await Client.open(session, url + "?user_id=late")
        await after.send({"type": "ping", "data": 1, "id": "p"})
        assert (await after.recv_type("pong"))["data"] == 1  # a connection opened after the command is not touched
