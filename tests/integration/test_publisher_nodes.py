"""Publisher and inspection against two real node processes in cluster mode.

Each publish kind must reach exactly its WebSocket clients on both nodes and
answer the number of nodes that took it; inspection read from Redis must
equal what the nodes' HTTP API says. Absence is proven without waiting: after
each targeted message a broadcast marker follows, and a client that was not
a target sees the marker first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

import hubnode.cluster  # noqa: F401  cluster mode is ours: a broken import must fail, not skip
from publisher import AsyncPublisher, Publisher
from tests.helpers import Client, NodeProcess, RedisServer, wait_until


@pytest.fixture
def nodes(redis_server: RedisServer, prefix: str) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Nodes "a" and "b" sharing one Redis under the test's key prefix."""
    started: list[NodeProcess] = []
    try:
        for node_id in ("a", "b"):
            started.append(NodeProcess("--redis-url", redis_server.url, "--key-prefix", prefix,
                                       "--node-id", node_id).start())
        yield started[0], started[1]
    finally:
        for node in started:
            node.stop()


@pytest.fixture
async def pub(redis_server: RedisServer, prefix: str) -> AsyncIterator[AsyncPublisher]:
    async with AsyncPublisher(redis_server.url, key_prefix=prefix, origin_id="test") as p:
        yield p


async def open_client(session: aiohttp.ClientSession, node: NodeProcess, user: str | None = None,
                      rooms: tuple[str, ...] = ()) -> Client:
    client = await Client.open(session, node.ws_url + (f"?user_id={user}" if user else ""))
    for room in rooms:
        await client.join(room)
    return client


async def next_message(client: Client) -> dict[str, Any]:
    """The next frame that is not an ack (joins may leave acks queued)."""
    while True:
        frame = await client.recv()
        if frame["type"] != "ack":
            return frame


async def test_each_kind_reaches_exactly_its_clients(
        nodes: tuple[NodeProcess, NodeProcess], pub: AsyncPublisher, session: aiohttp.ClientSession) -> None:
    """room, user and all publishes reach the right connections on both nodes and count the nodes."""
    a, b = nodes
    clients = {
        "alice@a": await open_client(session, a, "alice", ("room1",)),
        "bob@a": await open_client(session, a, "bob"),
        "carol@b": await open_client(session, b, "carol", ("room1", "room2")),
        "alice@b": await open_client(session, b, "alice"),
        "anon@b": await open_client(session, b),
    }
    cases = [
        (pub.broadcast_to_room("room1", {"type": "r1"}), 2, {"alice@a", "carol@b"}),
        (pub.broadcast_to_room("room2", {"type": "r2"}), 1, {"carol@b"}),
        (pub.broadcast_to_room("room3", {"type": "r3"}), 0, set()),
        (pub.broadcast_to_user("alice", {"type": "u1"}), 2, {"alice@a", "alice@b"}),
        (pub.broadcast_to_user("bob", {"type": "u2"}), 1, {"bob@a"}),
    ]
    for n, (publish, nodes_expected, targets) in enumerate(cases):
        assert await publish == nodes_expected
        assert await pub.broadcast_to_all({"type": "marker", "data": n}) == 2
        for name, client in clients.items():
            frame = await next_message(client)
            if name in targets:
                assert frame["type"] != "marker", (name, n)
                frame = await next_message(client)
            assert (frame["type"], frame["data"]) == ("marker", n), (name, n, frame)


async def test_sync_publisher_reaches_clients(
        nodes: tuple[NodeProcess, NodeProcess], redis_server: RedisServer, prefix: str,
        session: aiohttp.ClientSession) -> None:
    """The blocking Publisher delivers the same envelope the nodes decode, with its fields intact."""
    a, b = nodes
    alice = await open_client(session, a, "alice", ("room1",))
    carol = await open_client(session, b, "carol", ("room1",))
    with Publisher(redis_server.url, key_prefix=prefix) as sync_pub:
        sent = {"type": "news", "data": {"n": 1}, "metadata": {"src": "worker"}, "timestamp": 1_700_000_000}
        assert sync_pub.broadcast_to_room("room1", sent) == 2
    for client in (alice, carol):
        frame = await next_message(client)
        assert {k: frame[k] for k in sent} == sent


async def api(session: aiohttp.ClientSession, node: NodeProcess, path: str) -> Any:
    async with session.get(node.url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def member_set(members: list[dict[str, Any]]) -> set[tuple[str, str | None, str]]:
    return {(m["conn_id"], m["user_id"], m["node"]) for m in members}


async def test_inspection_equals_the_http_api(
        nodes: tuple[NodeProcess, NodeProcess], pub: AsyncPublisher, session: aiohttp.ClientSession) -> None:
    """rooms, room members and stats from Redis equal GET /api/rooms, /api/rooms/<room>, /api/stats."""
    a, b = nodes
    clients = [  # kept referenced: a collected client closes its socket
        await open_client(session, a, "alice", ("room1", "room2")),
        await open_client(session, a, rooms=("room1",)),
        await open_client(session, b, "carol", ("room1",)),
        await open_client(session, b, "dave"),
    ]

    async def agree() -> bool:
        stats = (await pub.stats()).to_json()
        return stats == {"clients": 4, "rooms": 2, "nodes": 2} and all(
            [await api(session, node, "/api/stats") == stats for node in nodes])

    await wait_until(agree, 10, what="Redis and both nodes to report 4 clients, 2 rooms, 2 nodes")
    rooms = await pub.rooms()
    assert rooms == {"room1": 3, "room2": 1}
    members = [m._asdict() for m in await pub.room_members("room1")]
    assert {m["node"] for m in members} == {"a", "b"}
    for node in nodes:
        assert (await api(session, node, "/api/rooms"))["rooms"] == rooms
        answer = await api(session, node, "/api/rooms/room1")
        assert member_set(answer["members"]) == member_set(members)
    live = await pub.nodes()
    assert [n.id for n in live] == ["a", "b"] and sum(n.clients for n in live) == 4
    assert all(n.heartbeat_age is None or n.heartbeat_age >= 0 for n in live)
    assert await pub.user_online("alice") == 1 and await pub.user_online("nobody") == 0
    assert len(clients) == 4


async def test_raw_publish_without_room_arrives_with_the_room(nodes: tuple[NodeProcess, NodeProcess],
                                                             redis_server: RedisServer, prefix: str,
                                                             session: aiohttp.ClientSession) -> None:
    """An envelope packed by hand (the README's Node.js example leaves `room` out) on a room channel
    reaches the room's members with `room` filled in, on every node, like the Python publisher's."""
    import msgpack
    import redis

    a, b = nodes
    members = [await open_client(session, a, "u1", ("orders",)), await open_client(session, b, "u2", ("orders",))]
    envelope = {"v": 1, "id": "raw-1", "origin": "pub:node-1", "msg": {"type": "order_shipped", "data": {"order": 42},
                                                                      "timestamp": 1}}
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.publish(f"{prefix}room:{{orders}}", msgpack.packb(envelope)) == 2
    for client in members:
        got = await client.recv_type("order_shipped")
        assert got["room"] == "orders" and got["data"] == {"order": 42} and "user_id" not in got
