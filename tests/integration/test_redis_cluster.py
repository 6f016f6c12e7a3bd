"""hubnode on a Redis Cluster (docs/redis.md), with real node processes.

Most tests share three nodes on the session's cluster (3 primaries, a
replica each, `redis_cluster.url`), with rooms and users placed so that one
of each lands on every shard. Every publishing path (client frames,
`POST /broadcast`, the Hub API, `Publisher`, `AsyncPublisher`, `hubctl`)
delivers exactly as on one Redis; the listings agree with the clients
joined; a room's messages travel only inside the shard that owns its slot;
a crash and a disconnect storm leave nothing behind but the live nodes' own
entries, on every primary. A plain `redis://` seed is found to be a cluster.
Failover, slot migration and Sentinel are in test_redis_failover.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from deploy.redis_servers import RedisClusterProcs, RedisProcess, ShardCounts, key_slot
from hubnode.appkey import NODE
from publisher import AsyncPublisher, Publisher
from publisher.keys import Keys
from tests.conftest import node_config, start_server
from tests.helpers import ROOT, Client, Cluster, NodeProcess, wait_until, wait_until_sync
from tests.integration.test_history import content, recv_n, say

PREFIX = "rcl:"
KEYS = Keys(PREFIX)
HB = 1.0  # heartbeat of the module's nodes: SIGSTOP for a moment (isolation test) stays far from expiry


@pytest.fixture(scope="module")
def hub(redis_cluster: RedisClusterProcs) -> Iterator[Cluster]:
    """Three nodes on the session's Redis Cluster for the whole module; tests use rooms and users of their own."""
    nodes = Cluster(redis_cluster.url, PREFIX, n=3, heartbeat=HB).start()
    yield nodes
    nodes.stop()


# -- placing names on shards, reading the whole cluster ---------------------------------------

def names_on_shards(cluster: RedisClusterProcs, stem: str) -> list[str]:
    """Names `<stem>-<n>`, the i-th of which hashes to a slot of the i-th primary (node order).

    A name is the hash tag of its room or user channel and keys, so all of
    them live on that primary.
    """
    owned = []
    for proc in cluster.primaries():
        me = cluster.myself(proc)
        assert me is not None, proc
        owned.append(me.slots)
    names: list[str | None] = [None] * len(owned)
    n = 0
    while None in names:
        name, n = f"{stem}-{n}", n + 1
        shard = next(i for i, slots in enumerate(owned) if key_slot(name.encode()) in slots)
        names[shard] = names[shard] or name
    return [name for name in names if name is not None]


def owner(cluster: RedisClusterProcs, channel: str) -> RedisProcess:
    """The primary that serves `channel`'s slot now."""
    return cluster.primary_of_slot(key_slot(channel.encode()))


def keys_on_every_primary(cluster: RedisClusterProcs, prefix: str) -> set[str]:
    """Every key under `prefix` in the cluster: a SCAN on each live primary (SCAN sees one node's keys)."""
    found: set[str] = set()
    for proc in cluster.primaries():
        with proc.client() as r:
            found.update(r.scan_iter(match=f"{prefix}*", count=1000))
    return found


def node_entries(prefix: str, node_ids: Sequence[str]) -> set[str]:
    """What live nodes keep in Redis with no client connected: the registry, their hash, their metrics."""
    keys = Keys(prefix)
    return {keys.nodes} | {k for n in node_ids for k in (keys.node(n), keys.node_metrics(n))}


def registered(cluster: RedisClusterProcs, prefix: str) -> set[str]:
    """The node ids in the registry index (`hub:nodes`)."""
    index = Keys(prefix).nodes
    return set(owner(cluster, index).call("ZRANGE", index, 0, -1))


def only_node_entries(cluster: RedisClusterProcs, prefix: str, node_ids: Sequence[str]) -> bool:
    """Nothing under `prefix` on any primary but `node_ids`' entries, and those nodes alone registered."""
    found = keys_on_every_primary(cluster, prefix)
    return found <= node_entries(prefix, node_ids) and registered(cluster, prefix) == set(node_ids)


def hubctl(url: str, *args: str) -> Any:
    """`hubctl --json ARGS` against the module's prefix; its JSON answer."""
    done = subprocess.run([sys.executable, "-m", "publisher.cli", "--redis-url", url, "--key-prefix", PREFIX,
                           "--json", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stderr, (done.returncode, done.stderr)
    return json.loads(done.stdout)


# -- three clients, three rooms, three users, one of each per shard ----------------------------

Send = tuple[str, str, tuple[str, str]]
"""(target kind "room"/"user"/"all", room or user, (frame type, content)) of one message sent."""


@dataclass
class Spread:
    """Client i on node i as user `users[i]`, a member of `rooms[i]` and `rooms[i + 1]`.

    Room j (on shard j) thus has members on two nodes: clients j and j - 1;
    user j (on shard j) is client j.
    """

    clients: list[Client]
    rooms: list[str]
    users: list[str]

    def members(self, room: str) -> list[int]:
        j = self.rooms.index(room)
        return [j, (j + 2) % 3]

    def recipients(self, kind: str, name: str) -> list[int]:
        if kind == "room":
            return self.members(name)
        return [self.users.index(name)] if kind == "user" else [0, 1, 2]

    async def check(self, sends: Sequence[Send]) -> None:
        """Every client gets exactly what was sent to it, each message once, and nothing more."""
        wanted: list[Counter[tuple[str, str]]] = [Counter(), Counter(), Counter()]
        for kind, name, label in sends:
            for i in self.recipients(kind, name):
                wanted[i][label] += 1
        for i, client in enumerate(self.clients):
            frames = await recv_n(client, sum(wanted[i].values()))
            assert Counter((f["type"], str(content(f))) for f in frames) == wanted[i], i
            await client.expect_silence()


async def spread(session: aiohttp.ClientSession, hub: Cluster, cluster: RedisClusterProcs, tag: str) -> Spread:
    rooms, users = names_on_shards(cluster, f"{tag}-room"), names_on_shards(cluster, f"{tag}-user")
    clients = [await Client.open(session, f"{hub.nodes[i].ws_url}?user_id={users[i]}") for i in range(3)]
    for i, client in enumerate(clients):
        await client.join(rooms[i], fid="a")
        await client.join(rooms[(i + 1) % 3], fid="b")
    assert [c.connected["node"] for c in clients] == [f"n{i + 1}" for i in range(3)]
    return Spread(clients, rooms, users)


# -- delivery ------------------------------------------------------------------------------------

async def test_client_messages_reach_exactly_their_recipients_on_every_shard(
        hub: Cluster, redis_cluster: RedisClusterProcs, session: aiohttp.ClientSession) -> None:
    """Room messages to a room on each shard, private messages to a user on each shard and a broadcast,
    sent by clients on three nodes: each arrives once at exactly its recipients."""
    s = await spread(session, hub, redis_cluster, "ws")
    primaries = [p.name for p in redis_cluster.primaries()]
    assert [owner(redis_cluster, KEYS.room_channel(r)).name for r in s.rooms] == primaries
    assert [owner(redis_cluster, KEYS.user_channel(u)).name for u in s.users] == primaries
    sends: list[Send] = []
    for j, room in enumerate(s.rooms):
        await s.clients[j].send(say(room, f"to {room}"))
        sends.append(("room", room, ("room_message", f"to {room}")))
    for j, user in enumerate(s.users):
        await s.clients[(j + 1) % 3].send({"type": "private_message",
                                           "data": {"user_id": user, "message": f"to {user}"}})
        sends.append(("user", user, ("private_message", f"to {user}")))
    await s.clients[2].send({"type": "broadcast", "data": "to all"})
    sends.append(("all", "", ("broadcast", "to all")))
    await s.check(sends)


async def test_http_hub_api_publishers_and_hubctl_deliver_on_every_shard(
        hub: Cluster, redis_cluster: RedisClusterProcs, session: aiohttp.ClientSession) -> None:
    """POST /broadcast, the Hub API of an in-process node, Publisher, AsyncPublisher and `hubctl publish`,
    each to a room and a user on every shard and to all: exactly the right clients get each message once,
    and each publish reports the nodes that took it (2 per room, 1 per user, every node for all)."""
    s = await spread(session, hub, redis_cluster, "paths")
    api = await start_server(node_config(redis_url=redis_cluster.url, key_prefix=PREFIX, node_id="api"))
    node = api.app[NODE]
    url = redis_cluster.url
    targets = [("room", r) for r in s.rooms] + [("user", u) for u in s.users] + [("all", "")]
    expected_nodes = {"room": 2, "user": 1, "all": 4}  # the module's three nodes and the in-process one
    sends: list[Send] = []
    try:
        with Publisher(url, key_prefix=PREFIX) as pub:
            async with AsyncPublisher(url, key_prefix=PREFIX) as apub:
                for kind, name in targets:
                    field = {"room": "room", "user": "user_id"}.get(kind)
                    body = {"type": "http", "data": f"http {kind} {name}", **({field: name} if field else {})}
                    async with session.post(f"{hub.nodes[len(sends) % 3].url}/broadcast", json=body) as resp:
                        assert resp.status == 202, await resp.text()
                    msgs = {p: {"type": p, "data": f"{p} {kind} {name}"} for p in ("api", "sync", "async", "hubctl")}
                    took = [await publish_with_node(node, kind, name, msgs["api"]),
                            publish_with(pub, kind, name, msgs["sync"]),
                            await publish_with_async(apub, kind, name, msgs["async"])]
                    where = ["--all"] if kind == "all" else [f"--{kind}", name]
                    answer = hubctl(url, "publish", *where, "--type", "hubctl", "--data",
                                    json.dumps(msgs["hubctl"]["data"]))
                    took.append(answer["nodes"])
                    assert took == [expected_nodes[kind]] * 4, (kind, name, took)
                    sends += [(kind, name, (p, f"{p} {kind} {name}")) for p in ("http", *msgs)]
        await s.check(sends)
    finally:
        await api.close()


async def publish_with_node(node: Any, kind: str, name: str, msg: dict[str, Any]) -> int:
    if kind == "all":
        return int(await node.broadcast_to_all(msg))
    send = node.broadcast_to_room if kind == "room" else node.broadcast_to_user
    return int(await send(name, msg))


def publish_with(pub: Publisher, kind: str, name: str, msg: dict[str, Any]) -> int:
    if kind == "all":
        return int(pub.broadcast_to_all(msg))
    return int(pub.broadcast_to_room(name, msg) if kind == "room" else pub.broadcast_to_user(name, msg))


async def publish_with_async(pub: AsyncPublisher, kind: str, name: str, msg: dict[str, Any]) -> int:
    if kind == "all":
        return int(await pub.broadcast_to_all(msg))
    return int(await (pub.broadcast_to_room(name, msg) if kind == "room" else pub.broadcast_to_user(name, msg)))


# -- listings ---------------------------------------------------------------------------------

async def test_listings_agree_with_the_clients_joined(
        hub: Cluster, redis_cluster: RedisClusterProcs, session: aiohttp.ClientSession) -> None:
    """/api/rooms, /api/rooms/<room>, /api/stats on every node and hubctl rooms, members and stats give
    exactly the rooms, members and counts of the clients joined, rooms on every shard."""
    s = await spread(session, hub, redis_cluster, "list")
    rooms = {room: 2 for room in s.rooms}
    stats = {"clients": 3, "rooms": 3, "nodes": 3}

    async def api(path: str, i: int) -> Any:
        async with session.get(f"{hub.nodes[i].url}{path}") as resp:
            assert resp.status == 200, path
            return await resp.json()

    async def only_ours() -> bool:  # earlier tests' clients of the module's nodes are gone
        return bool(await api("/api/stats", 0) == stats and (await api("/api/rooms", 0))["rooms"] == rooms)

    await wait_until(only_ours, timeout=10, what="the listings to show exactly this test's clients")
    for i in range(3):
        assert await api("/api/stats", i) == stats
        assert (await api("/api/rooms", i))["rooms"] == rooms
    assert hubctl(redis_cluster.url, "rooms") == {"rooms": rooms}
    assert hubctl(redis_cluster.url, "stats") == stats
    for room in s.rooms:
        want = sorted((s.clients[i].conn_id, s.users[i], f"n{i + 1}") for i in s.members(room))
        for i in range(3):
            members = (await api(f"/api/rooms/{room}", i))["members"]
            assert sorted((m["conn_id"], m["user_id"], m["node"]) for m in members) == want, (room, i)
        answer = hubctl(redis_cluster.url, "members", room)
        assert sorted((m["conn_id"], m["user_id"], m["node"]) for m in answer["members"]) == want, room


# -- sharded pub/sub stays inside its shard --------------------------------------------------------

def moved(before: dict[str, ShardCounts], after: dict[str, ShardCounts]) -> dict[str, tuple[int, ...]]:
    """Per cluster node, what changed: (SPUBLISH, PUBLISH, bus publish, bus publishshard) deltas, if any."""
    deltas: dict[str, tuple[int, ...]] = {}
    for name, b in before.items():
        a = after[name]
        delta = (a.spublish - b.spublish, a.publish - b.publish, a.bus_publish - b.bus_publish,
                 a.bus_publishshard - b.bus_publishshard)
        if any(delta):
            deltas[name] = delta
    return deltas


def bus_caught_up(cluster: RedisClusterProcs, before: dict[str, ShardCounts], replicas: list[RedisProcess],
            count: int) -> dict[str, ShardCounts] | None:
    """The counts now, once `replicas` have taken `count` shard messages over the bus since `before`."""
    now = cluster.shard_pubsub_counts()
    done = all(now[r.name].bus_publishshard - before[r.name].bus_publishshard >= count for r in replicas)
    return now if done else None


async def test_a_room_message_travels_only_inside_its_shard(
        hub: Cluster, redis_cluster: RedisClusterProcs, session: aiohttp.ClientSession) -> None:
    """20 messages to a room on each shard in turn: its primary serves 20 SPUBLISH and its replica gets
    20 shard messages over the bus; no other node's pub/sub counters move; the members get all 20."""
    s = await spread(session, hub, redis_cluster, "iso")
    count = 20
    with Publisher(redis_cluster.url, key_prefix=PREFIX) as pub:
        pub.stats()  # connect and load the slot map outside the counted window
        for room in s.rooms:
            primary = owner(redis_cluster, KEYS.room_channel(room))
            replicas = redis_cluster.replicas_of(primary)
            # freeze the nodes so their heartbeat probes (SPUBLISH on their own channels) cannot add to
            # the counts; Redis holds the messages for them meanwhile
            for node in hub.nodes:
                node.signal(signal.SIGSTOP)
            try:
                before = redis_cluster.shard_pubsub_counts()
                took = [pub.broadcast_to_room(room, {"type": "iso", "data": f"{room} {i}"}) for i in range(count)]
                # the cluster bus brings them to the replica a moment later
                after = wait_until_sync(functools.partial(bus_caught_up, redis_cluster, before, replicas, count), 5,
                                        "the shard's replica to get the messages over the cluster bus")
            finally:
                for node in hub.nodes:
                    node.signal(signal.SIGCONT)
            assert took == [2] * count
            assert moved(before, after) == {primary.name: (count, 0, 0, 0),
                                            **{r.name: (0, 0, 0, count) for r in replicas}}, room
    await s.check([("room", room, ("iso", f"{room} {i}")) for room in s.rooms for i in range(count)])


async def test_a_plain_seed_url_is_found_to_be_a_cluster(
        redis_cluster: RedisClusterProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """A node and a Publisher given `redis://` of one cluster node use the whole cluster: the node
    SSUBSCRIBEs each room on the primary that owns it (and only there), the Publisher SPUBLISHes,
    nobody sends a plain PUBLISH, and a message to a room on every shard arrives."""
    node = NodeProcess("--redis-url", redis_cluster.seed_url, "--key-prefix", prefix, "--node-id", "seed",
                       "--unsubscribe-grace", "0.2").start()
    try:
        rooms = names_on_shards(redis_cluster, "seed-room")
        client = await Client.open(session, f"{node.ws_url}?user_id=seed-user")
        for room in rooms:
            await client.join(room, fid=room)
        keys = Keys(prefix)
        for room in rooms:
            listed = {p.name: p.call("PUBSUB", "SHARDCHANNELS", f"{prefix}*") for p in redis_cluster.primaries()}
            assert [name for name, channels in listed.items() if keys.room_channel(room) in channels] == \
                [owner(redis_cluster, keys.room_channel(room)).name], (room, listed)
        before = redis_cluster.shard_pubsub_counts()
        with Publisher(redis_cluster.seed_url, key_prefix=prefix) as pub:
            assert [pub.broadcast_to_room(room, {"type": "seed", "data": room}) for room in rooms] == [1, 1, 1]
        for room in rooms:
            frame = await client.recv()
            assert (frame["type"], frame["room"], frame["data"]) == ("seed", room, room)
        after = redis_cluster.shard_pubsub_counts()
        for room in rooms:
            name = owner(redis_cluster, keys.room_channel(room)).name
            assert after[name].spublish > before[name].spublish, name
        assert all(after[n].publish == before[n].publish and after[n].bus_publish == before[n].bus_publish
                   for n in before), "a plain PUBLISH was sent"
    finally:
        node.stop()


# -- nothing left behind ------------------------------------------------------------------------------

async def test_a_killed_node_is_swept_from_every_shard(
        redis_cluster: RedisClusterProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """SIGKILL of a node whose clients are in rooms and are users on all three shards: its members,
    online entries and node keys go from every primary, the survivors' stay exact, and once the
    survivors' clients leave only the two live nodes' entries remain."""
    nodes = Cluster(redis_cluster.url, prefix, n=3, heartbeat=0.5).start()
    try:
        s = await spread(session, nodes, redis_cluster, "crash")
        extra = [await Client.open(session, f"{nodes.nodes[2].ws_url}?user_id={user}") for user in s.users]
        for client in extra:  # the doomed node also has a connection of every user and a member of every room
            for room in s.rooms:
                await client.join(room, fid=room)
        with Publisher(redis_cluster.url, key_prefix=prefix) as pub:
            assert all("n3" in {m.node for m in pub.room_members(room)} for room in s.rooms)
            assert [pub.user_online(user) for user in s.users] == [2, 2, 2]
        assert sum("{n3}" in key for key in keys_on_every_primary(redis_cluster, prefix)) >= 4
        nodes.nodes[2].signal(signal.SIGKILL)
        survivors = s.clients[:2]

        def swept() -> bool:
            found = keys_on_every_primary(redis_cluster, prefix)
            if any("{n3}" in key for key in found) or registered(redis_cluster, prefix) != {"n1", "n2"}:
                return False
            with Publisher(redis_cluster.url, key_prefix=prefix) as pub:
                members = {room: {m.conn_id for m in pub.room_members(room)} for room in s.rooms}
                online = [pub.user_online(user) for user in s.users]
            want = {room: {s.clients[i].conn_id for i in s.members(room) if i < 2} for room in s.rooms}
            return members == want and online == [1, 1, 0]

        await wait_until(swept, timeout=4 * 0.5 + 3, what="n3's entries to be swept from every shard")
        for client in survivors:
            await client.close()
        await wait_until(lambda: only_node_entries(redis_cluster, prefix, ["n1", "n2"]), timeout=10,
                         what="only n1's and n2's entries to remain")
    finally:
        nodes.stop()


async def test_a_disconnect_storm_leaves_only_node_entries(hub: Cluster, redis_cluster: RedisClusterProcs) -> None:
    """1,000 clients over the three nodes, in 30 rooms spread over the shards, close at the same moment:
    every primary ends up holding only the three nodes' own entries, each node with 0 clients."""
    rooms = [f"storm-{i}" for i in range(30)]
    assert len({owner(redis_cluster, KEYS.room_channel(r)).name for r in rooms}) == 3
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        clients = await asyncio.gather(*(Client.open(session, f"{hub.nodes[i % 3].ws_url}?user_id=storm-{i % 700}")
                                         for i in range(1000)))
        await asyncio.gather(*(c.join(rooms[i % 30]) for i, c in enumerate(clients)))
        with Publisher(redis_cluster.url, key_prefix=PREFIX) as pub:
            counts = pub.rooms()
            assert {r: counts.get(r) for r in rooms} == {r: 1000 // 30 + (i < 1000 % 30) for i, r in enumerate(rooms)}
    finally:
        await session.close()  # every socket at the same moment
    await wait_until(lambda: only_node_entries(redis_cluster, PREFIX, ["n1", "n2", "n3"]), timeout=30,
                     what="the storm to settle")
    with Publisher(redis_cluster.url, key_prefix=PREFIX) as pub:
        assert sorted((n.id, n.clients) for n in pub.nodes()) == [("n1", 0), ("n2", 0), ("n3", 0)]
