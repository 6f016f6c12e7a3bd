"""Several real nodes sharing one Redis behave as one hub (docs/redis.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import msgpack
import pytest
import redis.asyncio as aioredis

from publisher.keys import Keys
from tests.helpers import (
    Client,
    Cluster,
    RedisServer,
    membership_of,
    metric,
    only_node_entries,
    redis_state,
    sync_redis,
    wait_until,
)

PREFIX = "cl:"


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Three nodes for the whole module; tests use distinct rooms and users."""
    c = Cluster(redis_server.url, PREFIX, n=3).start()
    yield c
    c.stop()


@pytest.fixture
async def pub(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def connect(session: aiohttp.ClientSession, cluster: Cluster, i: int, user: str | None = None) -> Client:
    query = f"?user_id={user}" if user else ""
    return await Client.open(session, cluster.nodes[i].ws_url + query)


def hand_packed(msg: dict[str, object]) -> bytes:
    """An envelope as a worker in another language would build it: plain msgpack, no helpers."""
    return msgpack.packb({"v": 1, "id": f"ext-{time.time_ns()}", "origin": "pub:test", "msg": msg})


async def test_room_user_broadcast_and_private_cross_nodes(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Room, broadcast and private messages sent on one node reach clients on the others."""
    a = await connect(session, cluster, 0, "x-alice")
    b = await connect(session, cluster, 1, "x-bob")
    c = await connect(session, cluster, 2, "x-carol")
    assert {a.connected["node"], b.connected["node"], c.connected["node"]} == {"n1", "n2", "n3"}
    await a.join("x-room")
    await b.join("x-room")
    await c.send({"type": "broadcast", "data": "hello all"})
    for client in (a, b, c):
        assert (await client.recv_type("broadcast"))["user_id"] == "x-carol"
    await a.send({"type": "room_message", "data": {"room": "x-room", "message": "hi"}})
    assert (await b.recv_type("room_message"))["data"]["message"] == "hi"
    await c.send({"type": "private_message", "data": {"user_id": "x-bob", "message": "psst"}})
    got = await b.recv_type("private_message")
    assert got["user_id"] == "x-carol" and got["data"]["to"] == "x-bob"
    await c.expect_silence()


async def test_http_broadcast_on_any_node(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """POST /broadcast on one node reaches a room member on another."""
    a = await connect(session, cluster, 0, "h-alice")
    await a.join("h-room")
    resp = await session.post(f"{cluster.nodes[2].url}/broadcast", json={"type": "n", "data": 1, "room": "h-room"})
    assert resp.status == 202
    assert (await a.recv_type("n"))["room"] == "h-room"


async def test_external_publish_each_channel_kind(cluster: Cluster, session: aiohttp.ClientSession,
                                                  pub: aioredis.Redis) -> None:
    """A hand-packed envelope PUBLISHed on all, room and user channels reaches the right clients."""
    a = await connect(session, cluster, 0, "e-alice")
    b = await connect(session, cluster, 1, "e-bob")
    await a.join("e-room")
    assert await pub.publish(f"{PREFIX}room:{{e-room}}", hand_packed({"type": "r", "data": 1})) == 1
    assert (await a.recv_type("r"))["data"] == 1
    await b.expect_silence()
    assert await pub.publish(f"{PREFIX}user:{{e-bob}}", hand_packed({"type": "u", "data": 2})) == 1
    assert (await b.recv_type("u"))["data"] == 2
    assert await pub.publish(f"{PREFIX}all", hand_packed({"type": "all", "data": 3})) == 3
    assert (await a.recv_type("all"))["data"] == 3
    assert (await b.recv_type("all"))["data"] == 3


async def test_bad_payloads_are_dropped_not_fatal(cluster: Cluster, session: aiohttp.ClientSession,
                                                  pub: aioredis.Redis) -> None:
    """Undecodable payloads and unknown versions are dropped and counted; the node keeps delivering."""
    a = await connect(session, cluster, 0, "bad-alice")
    url = cluster.nodes[0].url
    dropped_before = await metric(session, url, "hubnode_envelopes_dropped_total")  # the cluster is module-shared
    await pub.publish(f"{PREFIX}user:{{bad-alice}}", b"\xc1garbage")
    await pub.publish(f"{PREFIX}user:{{bad-alice}}", msgpack.packb({"v": 99, "id": "x", "origin": "o", "msg": {}}))
    await pub.publish(f"{PREFIX}user:{{bad-alice}}", hand_packed({"type": "ok", "data": 1}))
    assert (await a.recv())["type"] == "ok"  # one subscriber, in order: both drops were handled before it
    assert await metric(session, url, "hubnode_envelopes_dropped_total") == dropped_before + 2


async def test_join_confirmed_then_external_publish_never_missed(cluster: Cluster, session: aiohttp.ClientSession,
                                                                pub: aioredis.Redis) -> None:
    """A publish made right after the join's ack always reaches the new member (300 rounds)."""
    a = await connect(session, cluster, 1, "j-alice")
    for i in range(300):
        room = f"j-{i}"
        await a.join(room, fid=i)
        await pub.publish(f"{PREFIX}room:{{{room}}}", hand_packed({"type": "j", "data": i}))
        assert (await a.recv_type("j"))["data"] == i
        await a.send({"type": "leave_room", "data": room})


async def test_order_from_one_publisher_on_every_node(cluster: Cluster, session: aiohttp.ClientSession,
                                                      pub: aioredis.Redis) -> None:
    """200 messages from one publisher arrive in publish order on every node."""
    clients = [await connect(session, cluster, i, f"o-{i}") for i in range(3)]
    for client in clients:
        await client.join("o-room")
    for n in range(200):
        await pub.publish(f"{PREFIX}room:{{o-room}}", hand_packed({"type": "seq", "data": n}))
    for client in clients:
        got = [(await client.recv_type("seq"))["data"] for _ in range(200)]
        assert got == list(range(200))


async def test_user_on_two_nodes_gets_each_message_once_per_connection(
        cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """A user connected to two nodes receives each user message once on each connection."""
    c1 = await connect(session, cluster, 0, "twice")
    c2 = await connect(session, cluster, 1, "twice")
    await c1.join("tw-room")  # several memberships must not duplicate a user message
    sender = await connect(session, cluster, 2, "tw-sender")
    await sender.send({"type": "private_message", "data": {"user_id": "twice", "message": 1}})
    for client in (c1, c2):
        await client.recv_type("private_message")
        await client.expect_silence()


async def test_redis_membership_equals_clients_and_empties(cluster: Cluster, session: aiohttp.ClientSession,
                                                          redis_server: RedisServer) -> None:
    """Redis membership is the union of the nodes' tables through joins, leaves and disconnects."""
    r = sync_redis(redis_server.url)
    clients = [await connect(session, cluster, i % 3, f"m-u{i % 4}" if i % 5 else None) for i in range(12)]
    expected: dict[str, dict[str, str]] = {}
    for i, client in enumerate(clients):
        for room in (f"m-r{i % 3}", f"m-r{i % 4}"):
            await client.join(room)
            expected.setdefault(room, {})[client.conn_id] = client.connected["user_id"] or ""
    await clients[0].request("leave_room", "m-r0", "leave")
    expected["m-r0"].pop(clients[0].conn_id)
    for client in clients[6:]:
        await client.close()
        for members in expected.values():
            members.pop(client.conn_id, None)
    expected = {room: m for room, m in expected.items() if m}

    def ours(state: dict[str, object]) -> dict[str, dict[str, str]]:
        return {k: v for k, v in membership_of(state, PREFIX).items() if k.startswith("m-")}

    await wait_until(lambda: ours(redis_state(r, PREFIX)) == expected, what="Redis membership to match")
    rooms = {k: len(v) for k, v in ours(redis_state(r, PREFIX)).items()}
    assert rooms == {room: len(m) for room, m in expected.items()}
    head = f"{PREFIX}online:{{"
    online = {k[len(head):-1]: r.hlen(k) for k in r.scan_iter(match=f"{head}m-*")}
    want_online: dict[str, int] = {}
    for client in clients[:6]:
        if client.connected["user_id"]:
            want_online[client.connected["user_id"]] = want_online.get(client.connected["user_id"], 0) + 1
    assert online == want_online
    api = await (await session.get(f"{cluster.nodes[2].url}/api/rooms/m-r1")).json()
    assert {m["conn_id"]: m["user_id"] or "" for m in api["members"]} == expected["m-r1"]
    for client in clients[:6]:
        await client.close()
    await wait_until(lambda: not ours(redis_state(r, PREFIX)), what="rooms to empty")
    await wait_until(lambda: not list(r.scan_iter(match=f"{PREFIX}online:{{m-*")), what="online empty")


async def test_only_node_entries_remain_when_clients_leave(redis_server: RedisServer) -> None:
    """After every client has gone, Redis holds only the node entries."""
    prefix = "only:"
    cluster = Cluster(redis_server.url, prefix, n=2).start()
    r = sync_redis(redis_server.url)
    try:
        async with aiohttp.ClientSession() as session:
            clients = [await connect(session, cluster, i % 2, f"u{i}") for i in range(6)]
            for i, client in enumerate(clients):
                await client.join(f"room{i % 3}")
            assert membership_of(redis_state(r, prefix), prefix)
        await wait_until(lambda: only_node_entries(r, prefix, 2), what="only node entries")
        assert all(r.hget(Keys(prefix).node(f"n{i}"), "clients") == "0" for i in (1, 2))
    finally:
        cluster.stop()
    assert redis_state(r, prefix) == {}, "drained nodes remove their own entries"


async def test_storm_of_closes_leaves_redis_exact(redis_server: RedisServer) -> None:
    """1,000 clients in hundreds of rooms closing at once leave Redis exactly consistent."""
    prefix = "storm:"
    cluster = Cluster(redis_server.url, prefix, n=1).start()
    r = sync_redis(redis_server.url)
    try:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = cluster.nodes[0].ws_url
        clients = await asyncio.gather(*(Client.open(session, f"{url}?user_id=s{i % 700}") for i in range(1000)))

        async def join3(i: int, client: Client) -> None:
            for k in range(3):
                await client.join(f"room{(i * 7 + k) % 300}", fid=k)

        await asyncio.gather(*(join3(i, c) for i, c in enumerate(clients)))
        assert int(r.hget(Keys(prefix).node("n1"), "clients")) == 1000
        total = sum(len(m) for m in membership_of(redis_state(r, prefix), prefix).values())
        assert total == sum(len({(i * 7 + k) % 300 for k in range(3)}) for i in range(1000))
        await session.close()  # every socket at the same moment
        await wait_until(lambda: only_node_entries(r, prefix, 1), timeout=20, what="storm to settle")
        assert r.hget(Keys(prefix).node("n1"), "clients") == "0"
        assert not list(r.scan_iter(match=f"{prefix}online:*"))
    finally:
        await session.close()
        cluster.stop()


async def test_storm_during_redis_pause_is_reconciled_and_counted(redis_server: RedisServer) -> None:
    """Updates that time out while Redis is paused are counted and reconciled by the heartbeat."""
    prefix = "pause:"
    cluster = Cluster(redis_server.url, prefix, n=1).start()
    r = sync_redis(redis_server.url)
    try:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = cluster.nodes[0].ws_url
        clients = await asyncio.gather(*(Client.open(session, f"{url}?user_id=p{i}") for i in range(200)))
        await asyncio.gather(*(c.join(f"room{i % 20}") for i, c in enumerate(clients)))
        r.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
        await session.close()
        await wait_until(lambda: only_node_entries(r, prefix, 1), timeout=20, what="reconciliation")
        assert r.hget(Keys(prefix).node("n1"), "clients") == "0"
        async with aiohttp.ClientSession() as s2:
            metrics = await (await s2.get(f"{cluster.nodes[0].url}/metrics")).text()
        failures = [line for line in metrics.splitlines()
                    if line.startswith("hubnode_membership_update_failures_total ")]
        assert failures and float(failures[0].split()[1]) > 0
    finally:
        await session.close()
        r.execute_command("CLIENT", "UNPAUSE")
        cluster.stop()
