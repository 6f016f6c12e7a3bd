"""Membership on a real Redis Cluster: one layout, the answers of one Redis, every script in one slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from deploy.redis_servers import RedisClusterProcs
from hubnode.membership.changes import Step, one_slot
from hubnode.membership.redis import _SCRIPTS, RedisMembershipStore
from publisher import AsyncPublisher, Publisher
from publisher.history import READ_SCRIPT
from publisher.keys import Keys
from publisher.query import Call, ScriptCall, run_step
from tests.helpers import RedisServer, wait_until

Conn = tuple[str, str | None, frozenset[str]]
Factory = Callable[[], Any]


def slot(key: str) -> int:
    return key_slot(key.encode())


def spread(cluster: RedisClusterProcs, key_of: Callable[[str], str], stem: str, per_shard: int = 1) -> list[str]:
    """Names f"{stem}<n>" whose keys fall `per_shard` on each primary, primary after primary."""
    by_primary: dict[int, list[str]] = {p.port: [] for p in cluster.primaries()}
    n = 0
    while any(len(names) < per_shard for names in by_primary.values()):
        name = f"{stem}{n}"
        owner = cluster.primary_of_slot(slot(key_of(name))).port
        if len(by_primary[owner]) < per_shard:
            by_primary[owner].append(name)
        n += 1
    return [name for names in by_primary.values() for name in names]


def dump(clients: list[redis.Redis], prefix: str) -> dict[str, Any]:
    """Every key under `prefix` on these servers (every primary of a cluster), volatile fields left out.

    Node hashes keep `clients` only (timestamps and expiries differ from run to run); the registry
    keeps its members, not their scores.
    """
    state: dict[str, Any] = {}
    for r in clients:
        for key in r.scan_iter(match=f"{prefix}*", count=1000):
            kind = r.type(key)
            if kind == "hash":
                value = r.hgetall(key)
                state[key] = {"clients": value.get("clients")} if key.endswith("}") and ":node:{" in key else value
            elif kind == "set":
                state[key] = r.smembers(key)
            elif kind == "zset":
                state[key] = sorted(r.zrange(key, 0, -1))
            else:
                state[key] = kind
    return state


def primaries(cluster: RedisClusterProcs) -> list[redis.Redis]:
    return [redis.Redis(port=p.port, decode_responses=True) for p in cluster.primaries()]


class Local:
    """What the nodes' routing tables would say: which local connection is in which room."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[str]] = {}  # conn -> rooms
        self.users: dict[str, str | None] = {}

    def node_has(self, node: str, room: str, but: str) -> bool:
        return any(room in rooms for conn, rooms in self.rooms.items() if conn != but and conn.startswith(node + ":"))

    async def connect(self, store: RedisMembershipStore, conn: str, user: str | None, limit: int = 0) -> bool | None:
        self.rooms[conn], self.users[conn] = set(), user
        return await store.add_connection(conn, user, limit)

    async def join(self, store: RedisMembershipStore, room: str, conn: str) -> None:
        self.rooms[conn].add(room)
        await store.add_member(room, conn, self.users[conn])

    async def leave(self, store: RedisMembershipStore, room: str, conn: str) -> None:
        self.rooms[conn].discard(room)
        await store.remove_member(room, conn, self.users[conn], emptied=not self.node_has(store.node_id, room, conn))

    async def disconnect(self, store: RedisMembershipStore, conn: str) -> None:
        rooms = sorted(self.rooms.pop(conn))
        emptied = {room for room in rooms if not self.node_has(store.node_id, room, conn)}
        await store.remove_connection(conn, self.users.pop(conn), rooms, emptied)

    def members(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for conn, rooms in self.rooms.items():
            for room in rooms:
                found.setdefault(room, {})[conn] = self.users[conn] or ""
        return found


class Recorder:
    """Records every script call a store makes (name, keys), however it is sent."""

    def __init__(self, *stores: RedisMembershipStore) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        for store in stores:
            self._wrap(store)

    def _wrap(self, store: RedisMembershipStore) -> None:
        call, pipeline = store._call, store._pipeline

        async def recorded_call(name: str, keys: list[str], args: list[Any]) -> Any:
            self.calls.append((name, tuple(keys)))
            return await call(name, keys, args)

        async def recorded_pipeline(steps: list[Step]) -> list[Any]:
            self.calls.extend((s.name, s.keys) for s in steps if s.name in _SCRIPTS)
            return await pipeline(steps)

        store._call = recorded_call  # type: ignore[method-assign]
        store._pipeline = recorded_pipeline  # type: ignore[method-assign]

    def check(self) -> set[str]:
        """Assert every recorded script call touched one slot; returns the scripts seen."""
        crossing = [(name, keys) for name, keys in self.calls if not one_slot(keys)]
        assert not crossing, crossing
        return {name for name, _ in self.calls}


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcs) -> AsyncIterator[Factory]:
    """A factory of asyncio cluster clients, all closed after the test (a store closes its own)."""
    made: list[RedisCluster] = []

    def make() -> RedisCluster:
        made.append(RedisCluster.from_url(redis_cluster.seed_url))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


async def scenario(make: Factory, prefix: str, rooms: list[str], users: list[str],
                   servers: list[redis.Redis]) -> dict[str, Any]:
    """Two nodes connect, join, leave and disconnect across `rooms`; every answer a reader can get, and
    the keys themselves (`servers`: where they live) before the nodes drain."""
    keys = Keys(prefix)
    n1, n2 = (RedisMembershipStore(make(), keys, node) for node in ("n1", "n2"))
    recorder = Recorder(n1, n2)
    local = Local()
    for store in (n1, n2):
        await store.start(lambda: ())
    for i in range(6):
        user = users[i % len(users)] if i != 5 else None
        await local.connect(n1 if i % 2 == 0 else n2, f"n{1 + i % 2}:{i}", user)
    for i in range(6):
        store = n1 if i % 2 == 0 else n2
        for room in rooms[i % 3::2]:
            await local.join(store, room, f"n{1 + i % 2}:{i}")
    await asyncio.gather(local.leave(n1, rooms[0], "n1:0"), local.join(n1, rooms[1], "n1:2"))
    await local.disconnect(n2, "n2:1")
    await local.disconnect(n1, "n1:4")
    want = local.members()
    answers = {
        "rooms": await n1.rooms(),
        "members": {room: sorted(await n2.members(room)) for room in rooms},
        "online": {user: await n1.online(user) for user in users},
        "stats": (await n2.stats()).to_json(),
        "nodes": [(n.id, n.clients) for n in await n1.nodes()],
    }
    assert answers["rooms"] == {room: len(m) for room, m in want.items()}
    assert {room: {m.conn_id: m.user_id or "" for m in ms} for room, ms in answers["members"].items() if ms} == want
    assert answers["online"] == {u: sum(1 for c, who in local.users.items() if who == u) for u in users}
    assert answers["stats"] == {"clients": 4, "rooms": len(want), "nodes": 2}
    answers["async publisher"] = await publisher_answers(n1.redis, prefix, rooms, users)
    answers["scripts"] = recorder.check()
    answers["layout"] = dump(servers, prefix)
    for store in (n1, n2):
        await store.close()
    return answers


async def publisher_answers(client: Any, prefix: str, rooms: list[str], users: list[str]) -> dict[str, Any]:
    """What AsyncPublisher (hubctl's queries) answers over the same client."""
    async with AsyncPublisher(key_prefix=prefix, client=client) as pub:
        return {"rooms": await pub.rooms(), "stats": (await pub.stats()).to_json(),
                "members": {room: sorted(await pub.room_members(room)) for room in rooms},
                "online": {user: await pub.user_online(user) for user in users}}


async def test_the_same_scenario_gives_the_same_answers_and_keys_on_one_redis_and_a_cluster(
        redis_cluster: RedisClusterProcs, cluster_client: Factory, redis_server: RedisServer, prefix: str) -> None:
    """Connects, joins, leaves and disconnects over rooms and users on all 3 shards answer as on one Redis."""
    keys = Keys(prefix)
    rooms = spread(redis_cluster, keys.members, "room", per_shard=2)
    users = spread(redis_cluster, keys.online, "user")
    single = redis.Redis.from_url(redis_server.url, decode_responses=True)
    on_one = await scenario(lambda: aioredis.Redis.from_url(redis_server.url), prefix, rooms, users, [single])
    on_cluster = await scenario(cluster_client, prefix, rooms, users, primaries(redis_cluster))
    assert on_one["layout"], "the scenario left members to compare"
    assert on_cluster == on_one
    assert on_one["async publisher"] == {k: on_one[k] for k in ("rooms", "stats", "members", "online")}
    assert dump(primaries(redis_cluster), prefix) == dump([single], prefix) == {}  # both drained

    # a sync Publisher on a sync cluster client reads a live layout like the store
    store = RedisMembershipStore(cluster_client(), keys, "n1")
    await store.start(lambda: [("n1:1", users[0], frozenset(rooms)), ("n1:2", None, frozenset(rooms[:2]))])
    sync_cluster = redis.RedisCluster.from_url(redis_cluster.seed_url)
    with Publisher(key_prefix=prefix, client=sync_cluster) as pub:  # type: ignore[arg-type]
        assert pub.rooms() == await store.rooms() == {room: 2 if room in rooms[:2] else 1 for room in rooms}
        assert pub.stats() == await store.stats()
        assert pub.user_online(users[0]) == await store.online(users[0]) == 1
        assert pub.room_members(rooms[0]) == await store.members(rooms[0])
    sync_cluster.close()
    await store.close()
    single.close()


async def test_a_crash_sweep_on_a_cluster_leaves_only_live_entries(
        redis_cluster: RedisClusterProcs, cluster_client: Factory, prefix: str) -> None:
    """A dead node with members in rooms and users on all 3 shards is swept: no key of it is left anywhere."""
    keys = Keys(prefix)
    rooms = spread(redis_cluster, keys.members, "room", per_shard=2)
    users = spread(redis_cluster, keys.online, "user", per_shard=3)
    table: list[Conn] = [(f"dead:{i}", users[i % len(users)] if i % 7 else None,
                          frozenset(rooms[j] for j in range(len(rooms)) if (i + j) % 3)) for i in range(450)]
    dead = RedisMembershipStore(cluster_client(), keys, "dead", heartbeat=0.001)
    live = RedisMembershipStore(cluster_client(), keys, "live", heartbeat=60)
    recorder = Recorder(dead, live)
    await dead.start(lambda: table)
    await live.start(lambda: [("live:1", users[0], frozenset({rooms[0]}))])
    await dead._tasks.close()  # the dead node stops writing, as a crashed process would
    assert await live.sweep(int(time.time() * 1000) + 60_000) == ["dead"]
    state = dump(primaries(redis_cluster), prefix)
    assert state == {
        keys.nodes: ["live"], keys.node("live"): {"clients": "1"}, keys.node_conns("live"): {"live:1"},
        keys.node_rooms("live"): {rooms[0]}, keys.node_users("live"): {users[0]: "1"},
        keys.members(rooms[0]): {"live:1": users[0]}, keys.presence(rooms[0]): {users[0]: "1"},
        keys.online(users[0]): {"live:1": "live"}}
    assert {"purge_next", "purge_hash", "purge_members", "purge_conns", "purge_end", "registry"} <= recorder.check()
    await live.close()
    assert dump(primaries(redis_cluster), prefix) == {}
    await dead.redis.aclose()


async def test_the_connection_limit_holds_across_nodes_on_a_cluster(
        redis_cluster: RedisClusterProcs, cluster_client: Factory, prefix: str) -> None:
    """40 concurrent connects of one user over two nodes with limit 5: exactly 5 counted, the rest undone."""
    keys = Keys(prefix)
    stores = [RedisMembershipStore(cluster_client(), keys, node) for node in ("n1", "n2")]
    for store in stores:
        await store.start(lambda: ())
    results = await asyncio.gather(*(stores[i % 2].add_connection(f"n{1 + i % 2}:{i}", "mallory", 5)
                                     for i in range(40)))
    assert sorted(results, key=str) == [False] * 35 + [True] * 5
    state = dump(primaries(redis_cluster), prefix)
    online = state[keys.online("mallory")]
    assert len(online) == 5 and all(conn.startswith(node + ":") for conn, node in online.items())
    for node in ("n1", "n2"):
        mine = {conn for conn in online if conn.startswith(node + ":")}
        assert state.get(keys.node_conns(node), set()) == mine
        assert state[keys.node(node)] == {"clients": str(len(mine))}
        assert state.get(keys.node_users(node), {}) == ({"mallory": str(len(mine))} if mine else {})
    assert await stores[0].online("mallory") == 5 and (await stores[1].stats()).clients == 5
    for store in stores:
        await store.close()


@pytest.mark.parametrize("lost", ["node hash", "node shard"])
async def test_reregistration_after_the_entry_vanished_restores_exactly(
        redis_cluster: RedisClusterProcs, cluster_client: Factory, prefix: str, lost: str) -> None:
    """The node's hash (or every key of its shard) vanishes; the next heartbeat rebuilds every key exactly."""
    keys = Keys(prefix)
    rooms = spread(redis_cluster, keys.members, "room", per_shard=2)
    users = spread(redis_cluster, keys.online, "user", per_shard=2)
    table: list[Conn] = [(f"n1:{i}", users[i % len(users)] if i % 5 else None,
                          frozenset(rooms[j] for j in range(len(rooms)) if (i * j) % 4 != 1)) for i in range(250)]
    store = RedisMembershipStore(cluster_client(), keys, "n1", heartbeat=60)
    await store.start(lambda: table)
    servers = primaries(redis_cluster)
    before = dump(servers, prefix)
    owner = redis.Redis(port=redis_cluster.primary_of_slot(slot(keys.node("n1"))).port, decode_responses=True)
    if lost == "node hash":
        owner.delete(keys.node("n1"))
    else:  # Redis lost that shard's data (our keys only: the cluster is shared)
        for key in list(owner.scan_iter(match=f"{prefix}*")):
            owner.delete(key)
    assert dump(servers, prefix) != before
    await store.heartbeat()
    assert store.counters.registrations == 2 and store.ready
    assert dump(servers, prefix) == before
    assert await store.rooms() == {room: sum(1 for _, _, r in table if room in r) for room in rooms}
    await store.close()


async def test_every_script_touches_one_slot_and_ships(redis_server: RedisServer, prefix: str) -> None:
    """On one Redis too (where nothing would refuse it), every script call's keys hash to one slot."""
    keys = Keys(prefix)
    a = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "a", heartbeat=0.001)
    b = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "b", heartbeat=60)
    recorder = Recorder(a, b)
    await a.start(lambda: [("a:1", "u", frozenset({"r1", "r2"}))])
    await b.start(lambda: ())
    await b.add_connection("b:1", "u", 1)
    await b.add_connection("b:2", "v", 1)
    await b.add_connection("b:3", "v", 1)  # refused
    await b.add_member("r1", "b:2", "v")
    await b.remove_member("r1", "b:2", "v", emptied=True)
    await b.remove_connection("b:2", "v", [], ())
    await a._tasks.close()  # a dies (its 3 ms expiry has passed)
    await b.heartbeat()  # ... and b's heartbeat sweeps it, in a task of its own
    await wait_until(lambda: b.counters.swept_nodes == 1, what="the sweep of a")
    await b.close()
    await a.redis.aclose()
    assert recorder.check() == set(_SCRIPTS)
    shipped = {p.name.removesuffix(".lua") for p in (resources.files("hubnode.membership") / "lua").iterdir()
               if p.name.endswith(".lua")}
    assert shipped == {*_SCRIPTS, "common"}


async def test_query_steps_span_slots_and_survive_a_script_flush_on_a_cluster(
        redis_cluster: RedisClusterProcs, prefix: str) -> None:
    """A list step of script calls and commands on keys of every shard runs on sync and asyncio cluster clients,
    also after the primaries forgot every script (a restart or a failover): they are loaded and the step resent."""
    keys = Keys(prefix)
    rooms = spread(redis_cluster, keys.members, "room")
    step: list[Call | ScriptCall] = []
    for room in rooms:
        refs = (keys.stream("room", room), keys.stream_meta("room", room), keys.stream_ids("room", room))
        step += [ScriptCall(READ_SCRIPT, refs, (-1, 0)), Call("hlen", (keys.members(room),))]
    want = [[None, 0, 0, []], 0] * len(rooms)
    sync_cluster = redis.RedisCluster.from_url(redis_cluster.seed_url)
    sync_cluster.script_flush()
    assert run_step(sync_cluster, step) == want
    assert run_step(sync_cluster, step[0]) == want[0]
    sync_cluster.close()
    async_cluster = RedisCluster.from_url(redis_cluster.seed_url)
    await async_cluster.script_flush()
    assert await run_step(async_cluster, step) == want
    await async_cluster.aclose()
