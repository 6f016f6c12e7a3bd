"""Redis membership: idempotent updates, ordering around re-registration, sweeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from hubnode.membership.redis import RedisMembershipStore
from publisher.keys import Keys
from tests.helpers import RedisServer, redis_state


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisMembershipStore]:
    s = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n1")
    yield s
    await s.close()


def counts(url: str, prefix: str) -> tuple[dict[str, str], str | None]:
    r = redis.Redis.from_url(url, decode_responses=True)
    return r.hgetall(f"{prefix}online"), r.hget(f"{prefix}node:n1", "clients")


async def test_connect_already_in_a_registration_is_not_counted_twice(
        store: RedisMembershipStore, redis_server: RedisServer, prefix: str) -> None:
    """A connect whose connection a re-registration already counted changes no count."""
    table = [("n1:1", "u", frozenset({"r"}))]
    await store.start(lambda: table)
    await store.add_connection("n1:1", "u")  # arrives after the snapshot that had it
    assert counts(redis_server.url, prefix) == ({"u": "1"}, "1")


async def test_disconnect_missing_from_a_registration_is_not_counted_twice(
        store: RedisMembershipStore, redis_server: RedisServer, prefix: str) -> None:
    """A disconnect already reflected by a re-registration does not decrement again."""
    table = [("n1:1", "u", frozenset()), ("n1:2", "u", frozenset())]
    await store.start(lambda: table)
    table.pop()
    await store._register()  # the snapshot without n1:2 ...
    await store.remove_connection("n1:2", "u", [], ())  # ... then its disconnect
    assert counts(redis_server.url, prefix) == ({"u": "1"}, "1")


async def test_updates_apply_in_the_order_made(store: RedisMembershipStore, redis_server: RedisServer,
                                               prefix: str) -> None:
    """Concurrent leave-with-emptied and a new join keep the room in the node's index; a sweep clears it."""
    await store.start(lambda: ())
    for conn in ("n1:1", "n1:2"):
        await store.add_connection(conn, None)
    await store.add_member("x", "n1:1", None)
    # locally: n1:1 leaves (the node's last member of x), then n1:2 joins x
    await asyncio.gather(store.remove_member("x", "n1:1", None, emptied=True),
                         store.add_member("x", "n1:2", None))
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert r.smembers(f"{prefix}node:n1:rooms") == {"x"}
    assert r.hgetall(f"{prefix}members:{{x}}") == {"n1:2": ""}
    r.zadd(f"{prefix}nodes", {"n1": 0})  # n1 now looks dead to a sweeper on another node
    other = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n2")
    assert await other.sweep() == ["n1"]
    await other.redis.aclose()
    assert redis_state(r, prefix) == {}


async def test_join_of_a_closed_connection_adds_nothing(store: RedisMembershipStore, redis_server: RedisServer,
                                                        prefix: str) -> None:
    """A join that reaches Redis after its connection's disconnect leaves no stale member."""
    await store.start(lambda: ())
    await store.add_connection("n1:1", "u")
    await store.remove_connection("n1:1", "u", [], ())
    await store.add_member("late", "n1:1", "u")
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert r.hlen(f"{prefix}members:{{late}}") == 0 and r.hget(f"{prefix}rooms", "late") is None
