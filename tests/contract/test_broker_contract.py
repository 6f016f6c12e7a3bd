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


# -- stream history (docs/protocol.md): the same offsets, epochs and window on both brokers --------

def _envelope(n: int, mid: str = "") -> tuple[bytes, str]:
    from publisher.envelope import Envelope, pack
    from publisher.message import Message

    mid = mid or f"m-{n}"
    return pack(Envelope(Message("t", n, room="h"), "pub:test", id=mid)), mid


async def _publish_n(broker: Broker, keys: Keys, count: int, size: int = 5, name: str = "h") -> None:
    from publisher.history import stream_of

    ref = stream_of(keys, "room", name)
    for n in range(1, count + 1):
        payload, mid = _envelope(n)
        await broker.publish_stream(ref, payload, mid, size, 60)


async def test_stream_publish_appends_with_contiguous_offsets_and_delivers_them(broker: Broker, keys: Keys) -> None:
    """Each publish gets the next offset and the same epoch; subscribers get the positioned envelope."""
    from publisher.envelope import unpack

    rec = Recorder()
    await broker.start(rec)
    await broker.subscribe([keys.room_channel("h")])
    await _publish_n(broker, keys, 3)
    await wait_until(lambda: len(rec.got) == 3, what="three deliveries")
    envs = [unpack(payload) for _, payload in rec.got]
    assert [e.offset for e in envs] == [1, 2, 3] and len({e.epoch for e in envs}) == 1
    assert [e.msg.data for e in envs] == [1, 2, 3] and envs[0].epoch is not None


async def test_stream_read_keeps_exactly_the_window(broker: Broker, keys: Keys) -> None:
    """With size 5 and 8 publishes, offsets 4-8 are kept; a read above 5 returns 6-8; recovery rules follow."""
    from publisher.envelope import unpack
    from publisher.history import stream_of

    await broker.start(Recorder())
    await _publish_n(broker, keys, 8)
    ref = stream_of(keys, "room", "h")
    read = await broker.read_stream(ref, 5)
    assert (read.top, read.kept) == (8, 5) and read.epoch is not None
    assert [unpack(p).offset for p in read.payloads] == [6, 7, 8]
    assert read.recovers(3, read.epoch) and read.recovers(8, read.epoch)
    assert not read.recovers(2, read.epoch)  # offset 3 left the window
    assert not read.recovers(9, read.epoch)  # beyond the newest offset
    assert not read.recovers(5, "another-epoch")
    assert [unpack(p).offset for p in (await broker.read_stream(ref, 0, 2)).payloads] == [4, 5]


async def test_stream_without_history_is_a_plain_publish_and_reads_create_only_when_asked(
        broker: Broker, keys: Keys) -> None:
    """Size 0 on a stream without history publishes without a position; a read with create makes epoch, offset 0."""
    from publisher.envelope import unpack
    from publisher.history import HistoryPolicy, stream_of

    rec = Recorder()
    await broker.start(rec)
    await broker.subscribe([keys.room_channel("plain")])
    ref = stream_of(keys, "room", "plain")
    payload, mid = _envelope(1)
    await broker.publish_stream(ref, payload, mid, 0, 60)
    await wait_until(lambda: rec.got, what="delivery")
    assert unpack(rec.got[0][1]).offset is None and rec.got[0][1] == payload
    assert (await broker.read_stream(ref, -1)).epoch is None
    created = await broker.read_stream(ref, -1, create=HistoryPolicy(size=3))
    assert created.epoch is not None and created.top == 0
    # now the stream has history: a publisher with none of its own appends anyway
    payload, mid = _envelope(2)
    await broker.publish_stream(ref, payload, mid, 0, 60)
    await wait_until(lambda: len(rec.got) == 2, what="second delivery")
    second = unpack(rec.got[1][1])
    assert (second.offset, second.epoch) == (1, created.epoch)


async def test_stream_retry_is_not_appended_twice_while_the_first_copy_is_kept(broker: Broker, keys: Keys) -> None:
    """The same envelope id sent again (a publisher's retry after a timeout), even after other
    publishes, keeps one entry and one offset, and is not delivered again; once the first copy has
    left the window, the id is forgotten."""
    from publisher.history import stream_of

    rec = Recorder()
    await broker.start(rec)
    await broker.subscribe([keys.room_channel("r")])
    ref = stream_of(keys, "room", "r")
    first, other = _envelope(1, "same-id"), _envelope(2, "other-id")
    await broker.publish_stream(ref, *first, 3, 60)
    await broker.publish_stream(ref, *other, 3, 60)
    assert await broker.publish_stream(ref, *first, 3, 60) == 0
    read = await broker.read_stream(ref, 0)
    assert (read.top, len(read.payloads)) == (2, 2)
    for n in range(3, 6):
        await broker.publish_stream(ref, *_envelope(n), 3, 60)
    await broker.publish_stream(ref, *first, 3, 60)  # offset 1 left the window (size 3): a new message
    await wait_until(lambda: len(rec.got) == 6, what="six deliveries")
    assert (await broker.read_stream(ref, -1)).top == 6
