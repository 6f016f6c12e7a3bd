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
the event loop. The queue is bounded by count and by bytes, and a single
payload by size: anything over a bound is dropped, counted, and answered with
a `resync`, like any other loss, so a flood or one huge worker payload cannot
grow the node without limit.

The broker keeps no list of channels: which channels the node needs is the
node's answer (`wanted`, owned by `hubnode.subscriptions`), asked on every
(re)connection. Its supervisor loop runs under the node's `Supervisor`.
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from hubnode.broker.base import BrokerCounters, BrokerUnavailable, MessageHandler, ResyncHandler, WantedChannels
from hubnode.broker.resp import SubscriberConnection, connect_subscriber
from hubnode.supervisor import Supervisor
from publisher.envelope import MAX_ENVELOPE_BYTES
from publisher.history import (
    PUBLISH_SCRIPT,
    READ_SCRIPT,
    HistoryPolicy,
    LuaScript,
    StreamRead,
    StreamRef,
    new_epoch,
    read_call,
)
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
                 timeout: float = 5.0, probe_interval: float = 2.0, max_pending: int = 100_000,
                 max_pending_bytes: int = 64 * 1024 * 1024, max_payload_bytes: int = MAX_ENVELOPE_BYTES,
                 name: str = "") -> None:
        self._url = url
        self._name = name
        self._pub = client
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._max_payload = max_payload_bytes
        self._own = keys.node_channel(node_id)
        self._own_b = self._own.encode()
        self._fixed = (keys.all, self._own)
        self._wanted: WantedChannels = lambda: self._fixed
        self._conn: SubscriberConnection | None = None
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._stale: dict[bytes, int] = {}  # confirmations still due for SUBSCRIBEs nobody waits for
        self._pending: deque[tuple[bytes, bytes]] = deque()
        self._pending_bytes = 0
        self._scheduled = False
        self._overflowed = False
        self._handler: MessageHandler = lambda channel, payload: None
        self._on_resync: ResyncHandler = lambda: None
        self._up = asyncio.Event()
        self._lost: asyncio.Future[str] | None = None
        self._tasks = Supervisor()
        self._closed = False
        self._last_probe = 0.0
        self._names: dict[bytes, str] = {}
        self.reconnects = 0
        self.probe_failures = 0
        self.overflows = 0
        self.oversized = 0
        self._ever_up = False  # a restarted loop must still resync after its first connection
        self._scripts: dict[str, Any] = {}  # redis-py Script objects, made on first use

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def counters(self) -> BrokerCounters:
        return BrokerCounters(reconnects=self.reconnects, probe_failures=self.probe_failures,
                              overflows=self.overflows, oversized=self.oversized)

    async def start(self, handler: MessageHandler, on_resync: ResyncHandler | None = None, *,
                    wanted: WantedChannels | None = None, supervisor: Supervisor | None = None) -> None:
        """Start the subscriber loop; waits up to the timeout for the first connection."""
        self._handler = handler
        if on_resync is not None:
            self._on_resync = on_resync
        if wanted is not None:
            self._wanted = wanted
        if supervisor is not None:
            self._tasks = supervisor
        self._tasks.spawn("redis-subscriber", self._supervise)
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
        try:
            await self._tasks.stop("redis-subscriber", 1.0)
        finally:
            self._up.clear()
            await self._pub.aclose()

    # -- subscriptions -------------------------------------------------------------
    async def subscribe(self, channels: Iterable[str]) -> None:
        todo = list(channels)
        conn = self._conn
        if not self.connected or conn is None:
            raise BrokerUnavailable("Redis subscriber is not connected")
        try:
            await self._subscribe_on(conn, todo)
        except (TimeoutError, ConnectionError) as exc:
            raise BrokerUnavailable(f"subscription not confirmed: {exc}") from None

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        todo = [c for c in channels if c not in self._fixed]
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
                raw = channel.encode()
                waiting = self._confirms.get(raw)
                if not future.done() and waiting is not None and future in waiting:
                    # the confirmation may still come: it belongs to nobody, and
                    # must not confirm a later SUBSCRIBE of the same channel
                    waiting.remove(future)
                    self._stale[raw] = self._stale.get(raw, 0) + 1
                    if not waiting:
                        del self._confirms[raw]

    # -- publishing ----------------------------------------------------------------
    async def publish(self, channel: str, payload: bytes) -> int:
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            return int(await self._pub.publish(channel, payload))
        except RedisError as exc:
            # the command may have reached Redis before the answer was lost:
            # never resend it here, and never claim that nothing went out
            raise BrokerUnavailable(f"publish failed: {exc}", maybe_published=True) from None

    def _script(self, script: LuaScript) -> Any:
        found = self._scripts.get(script.name)
        if found is None:
            found = self._scripts[script.name] = self._pub.register_script(script.text)
        return found

    async def publish_stream(self, ref: StreamRef, payload: bytes, envelope_id: str, size: int, ttl: int) -> int:
        """lua/publish.lua: append when the stream has history, then PUBLISH, atomically.

        A NOSCRIPT answer (Redis restarted and forgot the script) means nothing
        ran: redis-py's Script loads it and sends it again, which is safe.
        """
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            reply = await self._script(PUBLISH_SCRIPT)(keys=list(ref.keys),
                                               args=[ref.channel, payload, envelope_id, size, ttl, new_epoch()])
        except RedisError as exc:
            raise BrokerUnavailable(f"publish failed: {exc}", maybe_published=True) from None
        return int(reply[0])

    async def read_stream(self, ref: StreamRef, since: int, limit: int = 0,
                          create: HistoryPolicy | None = None) -> StreamRead:
        """lua/read.lua; sent once more after a broken connection (a pooled socket from before a
        Redis restart): unlike a publish, a read, even one that creates the epoch, is safe to repeat."""
        call = read_call(ref, since, limit, create)
        for attempt in (1, 2):
            try:
                reply = await self._script(READ_SCRIPT)(keys=list(call.keys), args=list(call.args))
                return StreamRead.from_reply(reply)
            except RedisConnectionError as exc:
                if attempt == 2:
                    raise BrokerUnavailable(f"history read failed: {exc}") from None
            except RedisError as exc:
                raise BrokerUnavailable(f"history read failed: {exc}") from None
        raise AssertionError("unreachable")

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
            size = len(payload)
            if size > self._max_payload:
                self.oversized += 1
                self._overflowed = True  # a message was lost: resync after the queue drains
                self._schedule()
                return
            if len(self._pending) >= self._max_pending or self._pending_bytes + size > self._max_pending_bytes:
                self.overflows += 1
                self._overflowed = True
                return
            self._pending.append((channel, payload))
            self._pending_bytes += size
            self._schedule()
        elif kind == b"subscribe":
            stale = self._stale.get(channel)
            if stale:  # Redis answers in order: this is the reply to an abandoned SUBSCRIBE
                if stale == 1:
                    del self._stale[channel]
                else:
                    self._stale[channel] = stale - 1
                return
            waiting = self._confirms.get(channel)
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirms[channel]
                if not future.done():
                    future.set_result(None)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Hand queued publications to the node, a batch per loop turn."""
        self._scheduled = False
        pending, handler, names = self._pending, self._handler, self._names
        for _ in range(min(_BATCH, len(pending))):
            raw, payload = pending.popleft()
            self._pending_bytes -= len(payload)
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
            log.warning("subscriber hand-off overflowed or a payload was over %d bytes: messages were "
                        "dropped, sending resync", self._max_payload)
            self._on_resync()

    async def _supervise(self) -> None:
        """Connect, subscribe, watch; on any loss reconnect with backoff and resync.

        A connection that is lost soon after it came up does not reset the
        backoff, so a flapping link cannot turn into a reconnect storm.
        """
        try:
            await self._reconnect_loop()
        finally:  # a crash must not leave the node believing a dead subscriber is up
            self._up.clear()
            if self._conn is not None:
                self._conn.close()
            self._fail_confirms()

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        ever_up = self._ever_up
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
                log.warning("Redis subscriber restored: resubscribed its channels, sending resync")
                self._on_resync()
            ever_up = self._ever_up = True
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

        conn = await connect_subscriber(self._url, self._on_push, on_lost, self._timeout, self._name)
        self._conn = conn
        self._lost = lost
        subscribed = {*self._fixed, *self._wanted()}
        try:
            await self._subscribe_on(conn, sorted(subscribed))
        except BaseException:
            conn.close()
            self._fail_confirms()
            raise
        # a channel released while this SUBSCRIBE was in flight could not be
        # unsubscribed (we were not connected): let go of it now
        released = subscribed - {*self._fixed, *self._wanted()}
        if released:
            conn.send("UNSUBSCRIBE", *sorted(released))
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
        self._stale.clear()  # a new connection owes no old replies
        for waiting in self._confirms.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(ConnectionError("subscriber connection lost"))
        self._confirms.clear()
