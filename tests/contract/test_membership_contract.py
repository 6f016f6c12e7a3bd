"""The MembershipStore contract, run over the memory store and the Redis store on one real redis-server
and on a real Redis Cluster (3 primaries with a replica each)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from hubnode.membership import Member, MembershipStore, MemoryMembershipStore
from hubnode.membership.redis import RedisMembershipStore
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
