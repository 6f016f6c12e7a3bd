"""The Redis broker: pub/sub between nodes, with supervised reconnection.

Publishes go through a redis-py client (pooled, every command with a timeout).
Subscriptions live on one dedicated connection (`resp.SubscriberConnection`)
owned by a supervisor task that reconnects with capped, jittered backoff,
resubscribes every wanted channel, and then tells the node to `resync` its
clients. A liveness probe, published on the node's own channel every
heartbeat, finds a subscriber that is half-open or deaf: three heartbeats
without the probe coming back force a reconnect.

Incoming publications are queued by the socket callback (which therefore
drains Redis as fast as bytes arrive) and handed to the node in batches from
the event loop; the queue is bounded, and an overflow is counted and answered
with a `resync`, like any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hubnode.broker.base import BrokerUnavailable, MessageHandler, ResyncHandler
from hubnode.broker.resp import SubscriberConnection, connect_subscriber
from publisher.keys import Keys

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

_PROBE = b"\x00probe"
_BATCH = 256
_MAX_BACKOFF = 5.0
_STABLE = 5.0  # seconds a connection must live before the backoff resets


class RedisBroker:
    """A Broker on one Redis (PROTOCOL.md section 7)."""

    def __init__(self, url: str, client: aioredis.Redis, keys: Keys, node_id: str, *,
                 timeout: float = 5.0, probe_interval: float = 2.0, max_pending: int = 100_000) -> None:
        self._url = url
        self._pub = client
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._max_pending = max_pending
        self._own = keys.node_channel(node_id)
        self._own_b = self._own.encode()
        self._pinned = {keys.all, self._own}
        self._wanted: set[str] = set(self._pinned)
        self._conn: SubscriberConnection | None = None
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._pending: deque[tuple[bytes, bytes]] = deque()
        self._scheduled = False
        self._overflowed = False
        self._handler: MessageHandler = lambda channel, payload: None
        self._on_resync: ResyncHandler = lambda: None
        self._up = asyncio.Event()
        self._lost: asyncio.Future[str] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._last_probe = 0.0
        self._names: dict[bytes, str] = {}
        self.reconnects = 0
        self.probe_failures = 0
        self.overflows = 0

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def start(self, handler: MessageHandler, on_resync: ResyncHandler | None = None) -> None:
        """Start the supervisor; waits up to the timeout for the first connection."""
        self._handler = handler
        if on_resync is not None:
            self._on_resync = on_resync
        self._supervisor = asyncio.create_task(self._supervise(), name="hubnode-redis-subscriber")
        try:
            async with asyncio.timeout(self._timeout):
                await self._up.wait()
        except TimeoutError:
            log.warning("Redis at %s is not reachable yet; the node is not ready until it is", self._url)

    async def close(self) -> None:
        """Stop the supervisor (bounded: a cancel must never hang a drain) and disconnect."""
        self._closed = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result("closing")
        if self._conn is not None:
            self._conn.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor], timeout=self._timeout)
        self._up.clear()
        await self._pub.aclose()

    # -- subscriptions -------------------------------------------------------------
    async def subscribe(self, channels: Iterable[str]) -> None:
        todo = [c for c in channels]
        self._wanted.update(todo)
        conn = self._conn
        if not self.connected or conn is None:
            self._wanted.difference_update(c for c in todo if c not in self._pinned)
            raise BrokerUnavailable("Redis subscriber is not connected")
        try:
            await self._subscribe_on(conn, todo)
        except BaseException as exc:
            # timed out or cancelled after SUBSCRIBE went out: take it back, or
            # Redis would go on delivering a channel nobody will ever release
            dropped = [c for c in todo if c not in self._pinned]
            self._wanted.difference_update(dropped)
            if dropped and self.connected:
                conn.send("UNSUBSCRIBE", *dropped)
            if isinstance(exc, TimeoutError | ConnectionError):
                raise BrokerUnavailable(f"subscription not confirmed: {exc}") from None
            raise

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        todo = [c for c in channels if c not in self._pinned]
        self._wanted.difference_update(todo)
        if todo and self._conn is not None and self.connected:
            self._conn.send("UNSUBSCRIBE", *todo)

    async def _subscribe_on(self, conn: SubscriberConnection, channels: list[str]) -> None:
        """Send one SUBSCRIBE and wait until Redis confirmed every channel."""
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            future: asyncio.Future[None] = loop.create_future()
            self._confirms.setdefault(channel.encode(), deque()).append(future)
            futures.append(future)
        conn.send("SUBSCRIBE", *channels)
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(*futures)
        finally:
            for channel, future in zip(channels, futures, strict=True):
                waiting = self._confirms.get(channel.encode())
                if not future.done() and waiting is not None and future in waiting:
                    waiting.remove(future)  # a late confirmation must not resolve a stale waiter
                    if not waiting:
                        del self._confirms[channel.encode()]

    # -- publishing ----------------------------------------------------------------
    async def publish(self, channel: str, payload: bytes) -> int:
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            return int(await self._pub.publish(channel, payload))
        except RedisError as exc:
            raise BrokerUnavailable(f"publish failed: {exc}") from None

    # -- the subscriber connection ---------------------------------------------------
    def _on_push(self, reply: Any) -> None:
        """Socket callback: runs as bytes arrive, so it only queues and returns."""
        if isinstance(reply, hiredis.ReplyError):
            # e.g. NOPERM/NOAUTH: confirmations can no longer be matched to
            # requests, so start over on a fresh connection (with backoff)
            log.warning("Redis refused a subscriber command: %s", reply)
            if self._conn is not None:
                self._conn.close()
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind, channel = reply[0], reply[1]
        if kind == b"message":
            payload = reply[2]
            if channel == self._own_b and payload.startswith(_PROBE):
                self._last_probe = asyncio.get_running_loop().time()
                return
            if len(self._pending) >= self._max_pending:
                self.overflows += 1
                self._overflowed = True
                return
            self._pending.append((channel, payload))
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._dispatch)
        elif kind == b"subscribe":
            waiting = self._confirms.get(channel)
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirms[channel]
                if not future.done():
                    future.set_result(None)

    def _dispatch(self) -> None:
        """Hand queued publications to the node, a batch per loop turn."""
        self._scheduled = False
        pending, handler, names = self._pending, self._handler, self._names
        for _ in range(min(_BATCH, len(pending))):
            raw, payload = pending.popleft()
            channel = names.get(raw)
            if channel is None:
                channel = names[raw] = raw.decode()
                if len(names) > 100_000:
                    names.clear()
            try:
                handler(channel, payload)
            except Exception:
                log.exception("message handler failed on %s", channel)
        if pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        elif self._overflowed:
            self._overflowed = False
            log.warning("subscriber hand-off overflowed: messages were dropped, sending resync")
            self._on_resync()

    async def _supervise(self) -> None:
        """Connect, subscribe, watch; on any loss reconnect with backoff and resync.

        A connection that is lost soon after it came up does not reset the
        backoff, so a flapping link cannot turn into a reconnect storm.
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        ever_up = False
        while not self._closed:
            if attempt:
                delay = min(_MAX_BACKOFF, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0)
                await asyncio.sleep(delay)
            try:
                lost = await self._connect()
            except (OSError, ConnectionError, TimeoutError) as exc:
                attempt += 1
                log.log(logging.WARNING if attempt == 1 else logging.DEBUG,
                        "Redis subscriber cannot connect (%s); retrying", exc)
                continue
            up_since = loop.time()
            if ever_up:
                self.reconnects += 1
                log.warning("Redis subscriber restored: resubscribed %d channels, sending resync",
                            len(self._wanted))
                self._on_resync()
            ever_up = True
            reason = await self._watch(lost)
            self._up.clear()
            if self._conn is not None:
                self._conn.close()
            self._fail_confirms()
            attempt = attempt + 1 if loop.time() - up_since < _STABLE else 0
            if not self._closed:
                log.warning("Redis subscriber lost: %s", reason)

    async def _connect(self) -> asyncio.Future[str]:
        """Open and subscribe a new connection; returns the future its loss resolves.

        Each connection has its own future, so the late loss callback of an
        old connection cannot mark the new one lost.
        """
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[str] = loop.create_future()

        def on_lost(exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(f"connection lost ({exc or 'closed by Redis'})")

        conn = await connect_subscriber(self._url, self._on_push, on_lost, self._timeout)
        self._conn = conn
        self._lost = lost
        try:
            await self._subscribe_on(conn, sorted(self._wanted))
        except BaseException:
            conn.close()
            self._fail_confirms()
            raise
        self._last_probe = loop.time()
        self._up.set()
        return lost

    async def _watch(self, lost: asyncio.Future[str]) -> str:
        """Return the reason once the subscriber is lost, probing it every interval."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            done, _ = await asyncio.wait([lost], timeout=self._probe_interval)
            if done:
                return lost.result()
            if loop.time() - self._last_probe > 3 * self._probe_interval:
                self.probe_failures += 1
                return "liveness probe did not come back for 3 heartbeats"
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # the cancel that close() sends, and the drain would hang
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._probe_interval):
                    await self._pub.publish(self._own, _PROBE)
        return "closing"

    def _fail_confirms(self) -> None:
        for waiting in self._confirms.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(ConnectionError("subscriber connection lost"))
        self._confirms.clear()
