"""The Broker contract, run over the memory broker and the Redis broker (real redis-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from hubnode.broker import Broker, BrokerUnavailable, MemoryBroker
from hubnode.broker.redis import RedisBroker
from publisher.keys import Keys
from tests.helpers import RedisServer, wait_until


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, channel: str, payload: bytes) -> None:
        self.got.append((channel, payload))


@pytest.fixture
def keys(prefix: str) -> Keys:
    """Channel names under this test's own prefix: the session's redis-server is shared."""
    return Keys(prefix)


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest, redis_server: RedisServer, keys: Keys) -> AsyncIterator[Broker]:
    if request.param == "memory":
        b: Broker = MemoryBroker()
    else:
        b = RedisBroker(redis_server.url, aioredis.Redis.from_url(redis_server.url), keys, "n1",
                        timeout=2, probe_interval=0.5)
    yield b
    await b.close()


async def test_publish_reaches_subscribed_handler(broker: Broker, keys: Keys) -> None:
    """A publish on a subscribed channel reaches the handler with its exact bytes."""
    rec = Recorder()
    c1 = keys.room_channel("c1")
    await broker.start(rec)
    await broker.subscribe([c1])
    assert await broker.publish(c1, b"\x00\xffpayload") == 1
    await wait_until(lambda: rec.got, what="delivery")
    assert rec.got == [(c1, b"\x00\xffpayload")]


async def test_unsubscribed_channel_is_not_delivered(broker: Broker, keys: Keys) -> None:
    """A publish on a channel nobody subscribed reaches nobody and counts 0."""
    rec = Recorder()
    c1 = keys.room_channel("c1")
    await broker.start(rec)
    await broker.subscribe([c1])
    assert await broker.publish(keys.room_channel("other"), b"x") == 0
    await broker.publish(c1, b"marker")
    await wait_until(lambda: rec.got, what="marker")
    assert rec.got == [(c1, b"marker")]


async def test_unsubscribe_stops_delivery(broker: Broker, keys: Keys) -> None:
    """After unsubscribe, publishes on the channel are no longer taken."""
    rec = Recorder()
    c1, c2 = keys.room_channel("c1"), keys.room_channel("c2")
    await broker.start(rec)
    await broker.subscribe([c1, c2])
    await broker.unsubscribe([c1])
    await wait_until(lambda: _publish_count(broker, c1, 0), what="unsubscribe to take effect")
    await broker.publish(c2, b"still")
    await wait_until(lambda: (c2, b"still") in rec.got, what="c2 delivery")
    assert all(ch != c1 for ch, _ in rec.got)


async def _publish_count(broker: Broker, channel: str, expected: int) -> bool:
    return await broker.publish(channel, b"probe") == expected


async def test_order_is_kept(broker: Broker, keys: Keys) -> None:
    """Publications from one publisher arrive in publish order."""
    rec = Recorder()
    channel = keys.room_channel("c")
    await broker.start(rec)
    await broker.subscribe([channel])
    for i in range(300):
        await broker.publish(channel, str(i).encode())
    await wait_until(lambda: len(rec.got) == 300, what="300 deliveries")
    assert [int(p) for _, p in rec.got] == list(range(300))


async def test_closed_broker_refuses(broker: Broker, keys: Keys) -> None:
    """After close, publish and subscribe raise BrokerUnavailable."""
    await broker.start(Recorder())
    await broker.close()
    assert not broker.connected
    with pytest.raises(BrokerUnavailable):
        await broker.publish(keys.room_channel("c"), b"x")
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe([keys.room_channel("c")])


async def test_redis_broker_close_is_bounded_while_probing(redis_server: RedisServer, prefix: str) -> None:
    """close() returns promptly even when it lands while a liveness probe is answered (no lost cancel)."""
    import time

    for _ in range(20):
        b = RedisBroker(redis_server.url, aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n1",
                        timeout=2, probe_interval=0.005)
        await b.start(Recorder())
        await wait_until(lambda b=b: b.connected, what="connected")
        started = time.monotonic()
        await b.close()
        assert time.monotonic() - started < 1.0
        assert not b.connected
