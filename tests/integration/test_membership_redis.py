"""Redis membership: idempotent updates, ordering around re-registration, sweeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from hubnode.membership.changes import Step
from hubnode.membership.redis import RedisMembershipStore
from publisher.keys import Keys
from tests.helpers import RedisServer, membership_of, redis_state


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisMembershipStore]:
    s = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n1")
    yield s
    await s.close()


def counts(url: str, prefix: str) -> tuple[dict[str, str], str | None]:
    """(the online hash of user "u", node n1's clients)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(prefix)
    return r.hgetall(keys.online("u")), r.hget(keys.node("n1"), "clients")


async def test_connect_already_in_a_registration_is_not_counted_twice(
        store: RedisMembershipStore, redis_server: RedisServer, prefix: str) -> None:
    """A connect whose connection a re-registration already counted changes no count."""
    table = [("n1:1", "u", frozenset({"r"}))]
    await store.start(lambda: table)
    await store.add_connection("n1:1", "u")  # arrives after the snapshot that had it
    assert counts(redis_server.url, prefix) == ({"n1:1": "n1"}, "1")


async def test_disconnect_missing_from_a_registration_is_not_counted_twice(
        store: RedisMembershipStore, redis_server: RedisServer, prefix: str) -> None:
    """A disconnect already reflected by a re-registration does not decrement again."""
    table = [("n1:1", "u", frozenset()), ("n1:2", "u", frozenset())]
    await store.start(lambda: table)
    table.pop()
    await store._register()  # the snapshot without n1:2 ...
    await store.remove_connection("n1:2", "u", [], ())  # ... then its disconnect
    assert counts(redis_server.url, prefix) == ({"n1:1": "n1"}, "1")


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
    assert r.smembers(Keys(prefix).node_rooms("n1")) == {"x"}
    assert r.hgetall(f"{prefix}members:{{x}}") == {"n1:2": ""}
    # n1 now looks claimed by a sweeper that died: another node's sweep finishes the job
    r.hset(Keys(prefix).node("n1"), "expiry", 0)
    r.zadd(f"{prefix}nodes", {"n1": 0})
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
    assert r.hlen(f"{prefix}members:{{late}}") == 0 and not r.sismember(Keys(prefix).node_rooms("n1"), "late")


async def test_a_stale_sweep_round_after_the_node_came_back_is_repaired(redis_server: RedisServer,
                                                                        prefix: str) -> None:
    """A sweeper stalled before a round of deletions while the node re-registered: the node is told to resync."""
    keys = Keys(prefix)
    table = [(f"a:{i}", f"u{i % 3}", frozenset({"lobby", "ops"})) for i in range(10)]
    a = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "a", heartbeat=0.5)
    b = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "b", heartbeat=0.5)
    await a.start(lambda: table)
    await b.start(lambda: [])
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    exact = redis_state(r, prefix)
    expired = int(time.time() * 1000) - 1
    r.hset(keys.node("a"), "expiry", expired)  # a was paused: its entry expired
    r.zadd(keys.nodes, {"a": expired})
    reached, gate = asyncio.Event(), asyncio.Event()
    real_pipeline = b._pipeline

    async def stall_before_deleting(steps: list[Step]) -> list[object]:
        if any(s.name in ("purge_hash", "purge_members") for s in steps) and not reached.is_set():
            reached.set()  # b claimed a and checked it is dead; its deletions are on their way
            await gate.wait()
        return await real_pipeline(steps)

    b._pipeline = stall_before_deleting  # type: ignore[method-assign]
    sweeping = asyncio.ensure_future(b.sweep())
    await reached.wait()
    await a.heartbeat()  # a wakes up, finds itself claimed and re-registers
    gate.set()
    assert await sweeping == []  # b's next guarded step found a alive
    assert membership_of(redis_state(r, prefix), prefix) == {}  # but its stale round deleted a's members
    assert r.hget(keys.node("a"), "resync") == "1"
    await a.heartbeat()  # ... so a's next heartbeat re-registers
    assert strip_times(redis_state(r, prefix), keys) == strip_times(exact, keys)
    assert a.counters.registrations == 3
    r.close()
    await a.close()
    await b.close()


def strip_times(state: dict[str, Any], keys: Keys) -> dict[str, Any]:
    """A redis_state() without what changes with every heartbeat (timestamps, the registry's order)."""
    state[keys.nodes] = sorted(state[keys.nodes])
    for node in ("a", "b"):
        for name in ("expiry", "heartbeat_at"):
            state.get(keys.node(node), {}).pop(name, None)
    return state
