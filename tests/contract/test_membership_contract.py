"""The MembershipStore contract, run over the memory store and the Redis store on one real redis-server
and on a real Redis Cluster (3 primaries with a replica each)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from hubnode.membership import Member, MembershipStore, MemoryMembershipStore
from hubnode.membership.redis import RedisMembershipStore
from publisher.envelope import unpack
from publisher.keys import Keys
from tests.helpers import RedisServer


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
                ) -> AsyncIterator[MembershipStore]:
    if request.param == "memory":
        s: MembershipStore = MemoryMembershipStore("n1")
    elif request.param == "redis":
        s = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n1")
    else:  # the session's cluster starts only when a test asks for it
        cluster = request.getfixturevalue("redis_cluster")
        s = RedisMembershipStore(RedisCluster.from_url(cluster.seed_url), Keys(prefix), "n1")
    await s.start(lambda: ())
    yield s
    await s.close()


async def test_join_and_leave_update_rooms_and_members(store: MembershipStore) -> None:
    """Joins add members and counts; a repeated join does not double count; leaves remove."""
    await store.add_connection("n1:1", "alice")
    await store.add_connection("n1:2", None)
    await store.add_member("r", "n1:1", "alice")
    await store.add_member("r", "n1:1", "alice")
    await store.add_member("r", "n1:2", None)
    assert await store.rooms() == {"r": 2}
    assert sorted(await store.members("r")) == [Member("n1:1", "alice", "n1"), Member("n1:2", None, "n1")]
    await store.remove_member("r", "n1:1", "alice")
    assert await store.rooms() == {"r": 1}


async def test_empty_room_disappears(store: MembershipStore) -> None:
    """A room whose last member leaves is gone from the room list."""
    await store.add_connection("n1:1", "u")
    await store.add_member("gone", "n1:1", "u")
    await store.remove_member("gone", "n1:1", "u", emptied=True)
    assert await store.rooms() == {}
    assert await store.members("gone") == []


async def test_disconnect_removes_everything(store: MembershipStore) -> None:
    """A disconnect removes the connection from all its rooms and the client count."""
    await store.add_connection("n1:1", "u")
    await store.add_connection("n1:2", "u")
    for room in ("a", "b"):
        await store.add_member(room, "n1:1", "u")
    await store.add_member("b", "n1:2", "u")
    assert (await store.stats()).clients == 2
    await store.remove_connection("n1:1", "u", ["a", "b"], {"a"})
    assert await store.rooms() == {"b": 1}
    stats = await store.stats()
    assert (stats.clients, stats.rooms, stats.nodes) == (1, 1, 1)


async def test_leaving_a_room_not_joined_is_harmless(store: MembershipStore) -> None:
    """Removing a member that is not there changes no count."""
    await store.add_connection("n1:1", None)
    await store.add_member("r", "n1:1", None)
    await store.remove_member("r", "n1:9", None)
    assert await store.rooms() == {"r": 1}


# -- presence (docs/protocol.md) ----------------------------------------------

class Events:
    """The presence events a store announces for room "p", as (event, user), in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.table: list[tuple[str, str | None, frozenset[str]]] = []  # the node's local table (its snapshot)
        self.pubsub: Any = None
        self.client: Any = None

    async def announce(self, room: str, event: str, user: str) -> None:  # the memory store's hook
        if room == "p":
            self.seen.append((event, user))

    async def until(self, count: int) -> list[tuple[str, str]]:
        """Every event up to `count` of them (Redis: read from the room channel), with a deadline."""
        async with asyncio.timeout(5):
            while self.pubsub is not None and len(self.seen) < count:
                msg = await self.pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] in ("message", "smessage"):
                    env = unpack(msg["data"])
                    assert env.msg.type == "presence" and env.msg.room == "p", env
                    self.seen.append((env.msg.data["event"], env.msg.data["user_id"]))
        return list(self.seen)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def announcing(request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
                     ) -> AsyncIterator[tuple[MembershipStore, Events]]:
    """A store that announces room "p" (only), and what it announced there."""
    events, keys = Events(), Keys(prefix)
    channel = keys.room_channel("p")
    if request.param == "memory":
        s: MembershipStore = MemoryMembershipStore("n1", announce=events.announce)
    elif request.param == "redis":
        s = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "n1",
                                 announces=lambda room: room == "p")
        events.client = aioredis.Redis.from_url(redis_server.url)
        events.pubsub = events.client.pubsub()
        await events.pubsub.subscribe(channel)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.seed_url)
        s = RedisMembershipStore(client, keys, "n1", announces=lambda room: room == "p", sharded=True)
        await client.initialize()
        owner = client.get_node_from_key(channel)
        assert owner is not None
        events.client = aioredis.Redis(host=owner.host, port=int(owner.port))
        events.pubsub = events.client.pubsub()
        await events.pubsub.ssubscribe(channel)
    if events.pubsub is not None:  # the subscribe confirmation
        async with asyncio.timeout(5):
            while await events.pubsub.get_message(timeout=1.0) is None:
                pass
    await s.start(lambda: list(events.table))
    yield s, events
    await s.close()
    if events.client is not None:
        await events.pubsub.aclose()
        await events.client.aclose()


async def test_presence_counts_users_once_and_anonymous_apart(store: MembershipStore) -> None:
    """Two connections of a user count once, with 2; anonymous members are counted apart."""
    for conn, user in (("n1:1", "alice"), ("n1:2", "alice"), ("n1:3", "bob"), ("n1:4", None)):
        await store.add_connection(conn, user)
        await store.add_member("p", conn, user)
    await store.add_member("p", "n1:1", "alice")  # a repeated join counts nothing
    found = await store.presence("p")
    assert (found.room, found.users, found.anonymous) == ("p", {"alice": 2, "bob": 1}, 1)
    await store.remove_connection("n1:1", "alice", ["p"])
    await store.remove_member("p", "n1:4", None)
    found = await store.presence("p")
    assert (found.users, found.anonymous) == ({"alice": 1, "bob": 1}, 0)
    assert (await store.presence("nobody-here")).to_json() == {"room": "nobody-here", "users": {}, "anonymous": 0}


async def test_a_users_first_and_last_connection_are_announced_once(
        announcing: tuple[MembershipStore, Events]) -> None:
    """join at the first connection in the room, leave at the last (leave or disconnect); none for anonymous
    members, repeated joins, other connections of a present user, or rooms not announced."""
    store, events = announcing
    for conn, user in (("n1:1", "alice"), ("n1:2", "alice"), ("n1:3", None), ("n1:4", "bob")):
        await store.add_connection(conn, user)
    await store.add_member("p", "n1:1", "alice")
    await store.add_member("p", "n1:2", "alice")
    await store.add_member("p", "n1:1", "alice")
    await store.add_member("p", "n1:3", None)
    await store.add_member("quiet", "n1:4", "bob")
    await store.add_member("p", "n1:4", "bob")
    await store.remove_member("p", "n1:1", "alice")
    await store.remove_member("p", "n1:3", None)
    await store.remove_member("quiet", "n1:4", "bob", emptied=True)
    await store.remove_connection("n1:2", "alice", ["p"])
    await store.remove_member("p", "n1:4", "bob", emptied=True)
    await store.remove_member("p", "n1:4", "bob", emptied=True)
    assert await events.until(4) == [("join", "alice"), ("join", "bob"), ("leave", "alice"), ("leave", "bob")]
    assert (await store.presence("p")).users == {}


@pytest.mark.parametrize("announcing", ["redis", "redis-cluster"], indirect=True)  # the memory store has no peers
async def test_a_swept_node_announces_the_leaves_of_its_users(
        announcing: tuple[MembershipStore, Events], redis_server: RedisServer, prefix: str) -> None:
    """The sweep of a dead node announces a leave for each user it held last, and none for users still here."""
    store, events = announcing
    assert isinstance(store, RedisMembershipStore)
    sharded = isinstance(store.redis, RedisCluster)
    if isinstance(store.redis, RedisCluster):
        seed = store.redis.get_default_node()
        client: Any = RedisCluster(host=seed.host, port=seed.port)
    else:
        client = aioredis.Redis.from_url(redis_server.url)
    dead = RedisMembershipStore(client, store.keys, "dead", heartbeat=60, announces=lambda room: room == "p",
                                sharded=sharded)
    table = [("dead:1", "carol", frozenset({"p"})), ("dead:2", "alice", frozenset({"p"}))]
    await dead.start(lambda: table)
    await store.add_connection("n1:1", "alice")
    await store.add_member("p", "n1:1", "alice")
    assert await events.until(2) == [("join", "carol"), ("join", "alice")]
    await dead._tasks.close()  # it stops writing, as a crashed process would
    assert await store.sweep(int(time.time() * 1000) + 600_000) == ["dead"]
    assert await events.until(3) == [("join", "carol"), ("join", "alice"), ("leave", "carol")]
    assert (await store.presence("p")).users == {"alice": 1}
    await client.aclose()


@pytest.mark.parametrize("announcing", ["redis", "redis-cluster"], indirect=True)  # only Redis re-registers
async def test_a_re_registration_announces_only_real_changes(announcing: tuple[MembershipStore, Events]) -> None:
    """After a failover or a failed write the node rewrites its entries: users still here are not announced as
    leaving and joining again; a departure (or arrival) whose write was lost is announced then, once."""
    store, events = announcing
    assert isinstance(store, RedisMembershipStore)
    for conn, user in (("n1:1", "alice"), ("n1:2", "bob")):
        events.table.append((conn, user, frozenset({"p"})))
        await store.add_connection(conn, user)
        await store.add_member("p", conn, user)
    assert await events.until(2) == [("join", "alice"), ("join", "bob")]
    events.table = [events.table[0], ("n1:3", "carol", frozenset({"p"}))]  # bob left, carol came: both writes lost
    store.reconcile()
    await store.heartbeat()
    # the arrivals are written before the departures are removed (a user here through another
    # connection is never announced leaving)
    assert await events.until(4) == [("join", "alice"), ("join", "bob"), ("join", "carol"), ("leave", "bob")]
    assert (await store.presence("p")).users == {"alice": 1, "carol": 1}
    events.table = [("n1:4", "carol", frozenset({"p"}))]  # alice left, carol swapped tabs: writes lost
    store.reconcile()
    await store.heartbeat()
    store.reconcile()  # again, with nothing lost: nothing to announce
    await store.heartbeat()
    assert (await store.presence("p")).users == {"carol": 1}  # alice left with her only tab: announced
    await store.remove_connection("n1:4", "carol", ["p"])  # a marker: nothing may come before it
    assert await events.until(6) == [("join", "alice"), ("join", "bob"), ("join", "carol"), ("leave", "bob"),
                                     ("leave", "alice"), ("leave", "carol")]


@pytest.mark.parametrize("announcing", ["redis", "redis-cluster"], indirect=True)
async def test_a_re_registration_cut_short_leaves_no_member_behind(
        announcing: tuple[MembershipStore, Events]) -> None:
    """A re-registration that fails halfway keeps the node's rooms in its index, so a member whose connection
    closes meanwhile is found and removed (its leave announced) by the next one: none stays for ever."""
    store, events = announcing
    assert isinstance(store, RedisMembershipStore)
    events.table = [("n1:1", "alice", frozenset({"p"}))]
    await store.add_connection("n1:1", "alice")
    await store.add_member("p", "n1:1", "alice")
    assert await events.until(1) == [("join", "alice")]
    real_call = store._call
    failed = []

    async def fail_once(name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "register_conns" and not failed:
            failed.append(name)
            raise TimeoutError("injected: Redis did not answer")
        return await real_call(name, keys, args)

    store._call = fail_once  # type: ignore[method-assign]
    store.reconcile()
    await store.heartbeat()  # the re-registration fails after its scan of the rooms
    assert failed == ["register_conns"]
    events.table = []
    await store.remove_connection("n1:1", "alice", ["p"])  # skipped: the store awaits a re-registration
    await store.heartbeat()
    assert await events.until(2) == [("join", "alice"), ("leave", "alice")]
    assert await store.members("p") == [] and (await store.presence("p")).users == {}
