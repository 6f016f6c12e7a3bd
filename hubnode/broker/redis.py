"""The Redis broker: pub/sub between nodes, with supervised reconnection.

Publishes go through a redis-py client (pooled, every command with a timeout).
Subscriptions live on dedicated connections (`resp.SubscriberConnection`):
one on a single Redis or a Sentinel-managed primary (found through the
Sentinels at every connection), and on a Redis Cluster one per shard that
owns a slot of a channel the node needs, with sharded pub/sub (SSUBSCRIBE,
SPUBLISH), so a room's messages travel only inside its shard (docs/redis.md,
hash slots). A supervisor task owns them all: it connects, subscribes every
wanted channel where its slot lives now, and, after any loss, reconnects
with capped, jittered backoff and tells the node to `resync` (recover from
history, else tell clients).

A loss is any of: a connection closed or reset; a liveness probe missing (a
publish on the node's own channel every heartbeat must come back, and every
subscriber connection must answer a PING within 3 heartbeats, so a
half-open socket or a deaf shard is found); an error reply on a subscriber
connection (MOVED after a slot moved, NOPERM); and a `sunsubscribe` that
Redis pushes when a slot the node listens on moved to another shard. The
whole set of connections is rebuilt from a fresh slot map then: a cluster
change is rare, and one path for every change keeps the recovery exact.

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
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from hubnode.broker.base import BrokerCounters, BrokerUnavailable, MessageHandler, ResyncHandler, WantedChannels
from hubnode.broker.resp import SubscriberConnection, connect_subscriber
from hubnode.supervisor import Supervisor
from publisher.core import redact_url
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
from publisher.redis_clients import discover_primary
from publisher.topology import Address, Target, parse

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

_PROBE = b"\x00probe"
_BATCH = 256
_MAX_BACKOFF = 5.0
_QUICK_BACKOFF = 0.5
_QUICK_ATTEMPTS = 16  # about 6 s of quick retries: longer than a Sentinel or cluster failover takes
_STABLE = 5.0  # seconds a connection must live before the backoff resets


class _Link:
    """One subscriber connection, to one Redis (a shard's primary on a cluster), and its last PING answer."""

    __slots__ = ("address", "conn", "last_pong")

    def __init__(self, address: Address | None, last_pong: float) -> None:
        self.address = address
        self.conn: SubscriberConnection | None = None
        self.last_pong = last_pong

    def __repr__(self) -> str:
        return "unix socket" if self.address is None else f"{self.address[0]}:{self.address[1]}"


class RedisBroker:
    """A Broker on one Redis, a Sentinel-managed primary, or a Redis Cluster (docs/redis.md)."""

    def __init__(self, target: Target | str, client: Any, keys: Keys, node_id: str, *,
                 timeout: float = 5.0, probe_interval: float = 2.0, max_pending: int = 100_000,
                 max_pending_bytes: int = 64 * 1024 * 1024, max_payload_bytes: int = MAX_ENVELOPE_BYTES,
                 name: str = "") -> None:
        self._target = parse(target) if isinstance(target, str) else target
        self._sharded = self._target.sharded
        if self._sharded:
            self._sub_cmd, self._unsub_cmd = "SSUBSCRIBE", "SUNSUBSCRIBE"
            self._message, self._confirm = b"smessage", b"ssubscribe"
        else:
            self._sub_cmd, self._unsub_cmd = "SUBSCRIBE", "UNSUBSCRIBE"
            self._message, self._confirm = b"message", b"subscribe"
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
        self._links: dict[Address | None, _Link] = {}
        self._opening: dict[tuple[int, Address | None], asyncio.Future[_Link]] = {}  # by (round, address)
        self._at: dict[str, Address | None] = {}  # channel -> the link it is subscribed on
        self._primary: Address | None = self._target.hosts[0] if self._target.hosts else None
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._stale: dict[bytes, int] = {}  # confirmations still due for SUBSCRIBEs nobody waits for
        self._releasing: dict[bytes, int] = {}  # our own SUNSUBSCRIBEs whose replies are still due
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
        self._cluster_ready = False
        self.reconnects = 0
        self.probe_failures = 0
        self.overflows = 0
        self.oversized = 0
        self.topology_changes = 0
        self._ever_up = False  # a restarted loop must still resync after its first connection
        self._scripts: dict[str, Any] = {}  # redis-py Script objects, made on first use

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def sharded(self) -> bool:
        """True on a Redis Cluster (SPUBLISH/SSUBSCRIBE)."""
        return self._sharded

    @property
    def shards(self) -> list[str]:
        """host:port of every subscriber connection open now (one per shard in use on a cluster)."""
        return sorted(repr(link) for link in self._links.values())

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
            log.warning("Redis at %s is not reachable yet; the node is not ready until it is",
                        redact_url(self._target.url))

    async def close(self) -> None:
        """Stop the supervisor (bounded: a cancel must never hang a drain) and disconnect."""
        self._closed = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result("closing")
        self._drop_links()
        try:
            await self._tasks.stop("redis-subscriber", 1.0)
        finally:
            self._up.clear()
            await self._pub.aclose()

    # -- routing -----------------------------------------------------------------
    def _route(self, channel: str) -> Address | None:
        """Where `channel` lives: the shard owning its slot on a cluster, else the one primary."""
        if not self._sharded:
            return self._primary
        try:
            node = self._pub.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        except Exception as exc:  # slot not covered, or the map not loaded: a topology problem
            raise ConnectionError(f"no shard serves the slot of {channel!r}: {exc}") from None
        return (str(node.host), int(node.port))

    def _group(self, channels: Iterable[str]) -> dict[Address | None, list[str]]:
        groups: dict[Address | None, list[str]] = {}
        for channel in channels:
            groups.setdefault(self._route(channel), []).append(channel)
        return groups

    async def _refresh(self) -> None:
        """Read where things live now: the slot map, or the primary the Sentinels name."""
        async with asyncio.timeout(self._timeout):
            if self._sharded:
                if not self._cluster_ready:
                    await self._pub.initialize()
                    self._cluster_ready = True
                else:
                    await self._pub.nodes_manager.initialize()
            elif self._target.kind == "sentinel":
                self._primary = await discover_primary(self._target, self._timeout)

    # -- subscriptions -------------------------------------------------------------
    async def subscribe(self, channels: Iterable[str]) -> None:
        todo = list(channels)
        if not self.connected:
            raise BrokerUnavailable("Redis subscriber is not connected")
        try:
            groups = self._group(todo)
            await asyncio.gather(*(self._subscribe_at(address, group) for address, group in groups.items()))
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise BrokerUnavailable(f"subscription not confirmed: {exc}") from None

    async def _subscribe_at(self, address: Address | None, channels: list[str]) -> None:
        link = self._links.get(address)
        if link is None:
            link = await self._open_link(address)
        assert link.conn is not None
        for channel in channels:
            self._at[channel] = address
        await self._subscribe_on(link.conn, channels)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        if self.connected:
            self._release(channels)

    def _release(self, channels: Iterable[str]) -> None:
        """Unsubscribe `channels` (never the fixed ones) on the links they were subscribed on."""
        groups: dict[Address | None, list[str]] = {}
        for channel in channels:
            if channel not in self._fixed and channel in self._at:
                groups.setdefault(self._at.pop(channel), []).append(channel)
        for address, group in groups.items():
            link = self._links.get(address)
            if link is not None and link.conn is not None:
                self._send_unsubscribe(link.conn, group)

    def _send_unsubscribe(self, conn: SubscriberConnection, channels: list[str]) -> None:
        if not self._sharded:
            conn.send(self._unsub_cmd, *channels)
            return
        for channel in channels:  # one slot per command on a cluster; the reply is ours, not a move
            raw = channel.encode()
            self._releasing[raw] = self._releasing.get(raw, 0) + 1
            conn.send(self._unsub_cmd, channel)

    async def _subscribe_on(self, conn: SubscriberConnection, channels: list[str]) -> None:
        """Send the SUBSCRIBE (one per channel on a cluster) and wait until Redis confirmed every channel."""
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            future: asyncio.Future[None] = loop.create_future()
            self._confirms.setdefault(channel.encode(), deque()).append(future)
            futures.append(future)
        if self._sharded:
            for channel in channels:
                conn.send(self._sub_cmd, channel)
        else:
            conn.send(self._sub_cmd, *channels)
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
            if self._sharded:
                return int(await self._pub.spublish(channel, payload))
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
        """lua/publish.lua: append when the stream has history, then (S)PUBLISH, atomically.

        A NOSCRIPT answer (Redis restarted and forgot the script) means nothing
        ran: redis-py's Script loads it and sends it again, which is safe.
        """
        if not self.connected:
            raise BrokerUnavailable("Redis is unreachable")
        try:
            reply = await self._script(PUBLISH_SCRIPT)(
                keys=list(ref.keys),
                args=[ref.channel, payload, envelope_id, size, ttl, new_epoch(), sharded_flag(self._sharded)])
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

    # -- the subscriber connections ----------------------------------------------------
    def _on_push(self, reply: Any, link: _Link | None = None) -> None:
        """Socket callback: runs as bytes arrive, so it only queues and returns."""
        if isinstance(reply, hiredis.ReplyError):
            # e.g. MOVED (a slot moved under a SSUBSCRIBE) or NOPERM: confirmations
            # can no longer be matched to requests, so start over from a fresh map
            log.warning("Redis refused a subscriber command: %s", reply)
            self._lose(f"Redis refused a subscriber command ({reply})")
            return
        if not isinstance(reply, list) or len(reply) < 3:
            # a PING's answer: "pong" (subscribed) or PONG (a link with no channel left)
            if link is not None and (reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong")):
                link.last_pong = asyncio.get_running_loop().time()
            return
        kind, channel = reply[0], reply[1]
        if kind == self._message:
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
        elif kind == self._confirm:
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
        elif kind == b"sunsubscribe":
            due = self._releasing.get(channel)
            if due:
                if due == 1:
                    del self._releasing[channel]
                else:
                    self._releasing[channel] = due - 1
                return
            # Redis dropped the node from a channel it did not release: the
            # channel's slot moved to another shard (docs/redis.md)
            self.topology_changes += 1
            self._lose(f"the slot of {channel.decode(errors='replace')!r} moved to another shard")

    def _lose(self, reason: str) -> None:
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(reason)

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
            self._drop_links()
            self._fail_confirms()

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        ever_up = self._ever_up
        while not self._closed:
            if attempt:
                # a failover or a slot move settles within seconds: retry every half second or
                # less for the first _QUICK_ATTEMPTS, then back off (x1.5 per attempt) to 5 s
                cap = _QUICK_BACKOFF if attempt <= _QUICK_ATTEMPTS else _MAX_BACKOFF
                delay = min(cap, 0.1 * 1.5 ** attempt) * random.uniform(0.5, 1.0)
                await asyncio.sleep(delay)
            try:
                lost = await self._connect()
            except (OSError, ConnectionError, TimeoutError, RedisError) as exc:
                attempt += 1
                log.log(logging.WARNING if attempt == 1 else logging.DEBUG,
                        "Redis subscriber cannot connect (%s); retrying", exc or type(exc).__name__)
                continue
            up_since = loop.time()
            if ever_up:
                self.reconnects += 1
                log.warning("Redis subscriber restored on %s: resubscribed its channels, sending resync",
                            ", ".join(self.shards))
                self._on_resync()
            ever_up = self._ever_up = True
            reason = await self._watch(lost)
            self._up.clear()
            self._drop_links()
            self._fail_confirms()
            attempt = attempt + 1 if loop.time() - up_since < _STABLE else 0
            if not self._closed:
                log.warning("Redis subscriber lost: %s", reason)

    async def _open_link(self, address: Address | None, lost: asyncio.Future[str] | None = None) -> _Link:
        """A subscriber connection to `address`, opened once however many callers ask at the same time.

        Its loss is reported on `lost` (this generation's future), so the late
        loss callback of a connection from before a reconnect cannot mark the
        new set lost.
        """
        generation = lost if lost is not None else self._lost
        key = (id(generation), address)
        opening = self._opening.get(key)
        if opening is not None:
            return await asyncio.shield(opening)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Link] = loop.create_future()
        self._opening[key] = future
        link = _Link(address, loop.time())

        def on_lost(exc: Exception | None) -> None:
            # only a link in use can lose the set: one that failed while opening
            # (AUTH, CLIENT SETNAME, a timeout) fails its own subscribe, nothing more
            if self._links.get(address) is link and generation is not None and not generation.done():
                generation.set_result(f"connection to {link!r} lost ({exc or 'closed by Redis'})")

        async def open_() -> _Link:
            try:
                link.conn = await connect_subscriber(self._target, address,
                                                     lambda reply: self._on_push(reply, link),
                                                     on_lost, self._timeout, self._name)
                if generation is None or generation.done():  # the set this link was for is gone already
                    link.conn.close()
                    raise ConnectionError("subscriber connections were reset meanwhile")
                self._links[address] = link
                future.set_result(link)
                return link
            except BaseException as exc:
                future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
                future.exception()  # retrieved: nobody else may be waiting
                raise
            finally:
                self._opening.pop(key, None)

        # shielded: a caller cancelled while the link opens (a client gone mid-join)
        # must not leave a half-open connection behind for the others who wait on it
        task = asyncio.ensure_future(open_())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if nobody waits any more
        return await asyncio.shield(task)

    async def _connect(self) -> asyncio.Future[str]:
        """Open and subscribe a new set of connections; returns the future their loss resolves."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[str] = loop.create_future()
        self._lost = lost
        try:
            await self._refresh()
            subscribed = {*self._fixed, *self._wanted()}
            groups = self._group(sorted(subscribed))
            links = await asyncio.gather(*(self._open_link(address, lost) for address in groups))
            for link, group in zip(links, groups.values(), strict=True):
                for channel in group:
                    self._at[channel] = link.address
            await asyncio.gather(*(self._subscribe_on(link.conn, group)  # type: ignore[arg-type]
                                   for link, group in zip(links, groups.values(), strict=True)))
        except BaseException:
            if not lost.done():
                lost.set_result("connect failed")
            self._drop_links()
            self._fail_confirms()
            raise
        # a channel released while this SUBSCRIBE was in flight could not be
        # unsubscribed (we were not connected): let go of it now
        self._release(sorted(subscribed - {*self._fixed, *self._wanted()}))
        now = loop.time()
        self._last_probe = now
        for link in self._links.values():
            link.last_pong = now
        self._up.set()
        return lost

    async def _watch(self, lost: asyncio.Future[str]) -> str:
        """Return the reason once the subscribers are lost, probing them every interval."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            done, _ = await asyncio.wait([lost], timeout=self._probe_interval)
            if done:
                return lost.result()
            now = loop.time()
            if now - self._last_probe > 3 * self._probe_interval:
                self.probe_failures += 1
                return "liveness probe did not come back for 3 heartbeats"
            for link in list(self._links.values()):
                if now - link.last_pong > 3 * self._probe_interval:
                    self.probe_failures += 1
                    return f"subscriber connection to {link!r} did not answer PING for 3 heartbeats"
                if link.conn is not None:
                    link.conn.send("PING")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # the cancel that close() sends, and the drain would hang
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._probe_interval):
                    if self._sharded:
                        await self._pub.spublish(self._own, _PROBE)
                    else:
                        await self._pub.publish(self._own, _PROBE)
        return "closing"

    def _drop_links(self) -> None:
        links, self._links = self._links, {}
        self._at.clear()
        self._releasing.clear()
        for link in links.values():
            if link.conn is not None:
                link.conn.close()

    def _fail_confirms(self) -> None:
        self._stale.clear()  # a new connection owes no old replies
        for waiting in self._confirms.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(ConnectionError("subscriber connection lost"))
        self._confirms.clear()


def sharded_flag(sharded: bool) -> str:
    """lua/publish.lua's ARGV[7]: '1' publishes with SPUBLISH (Redis Cluster), '' with PUBLISH."""
    return "1" if sharded else ""
