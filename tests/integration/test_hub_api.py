"""The Hub API for library users, and mounting a hub in an existing aiohttp app."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from hubnode import Node, mount
from tests.conftest import node_config
from tests.helpers import Client


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
