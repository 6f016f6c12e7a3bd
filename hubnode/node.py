"""The Node: local connections, the broker, the membership store, and the Hub API.

Every publish, local ones included, goes to the broker; the broker calls
`on_message` on every node (this one too); `on_message` encodes the client
frame once and writes the same bytes to each target connection without
awaiting any of them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson

from hubnode import __version__
from hubnode.auth import Authenticate, Authorize, Identity, builtin_authenticate, builtin_authorize, checked_user_ids
from hubnode.broker.base import Broker, BrokerUnavailable
from hubnode.broker.memory import MemoryBroker
from hubnode.config import Config
from hubnode.connection import Connection, Flusher
from hubnode.counters import MetricsSource, MetricsStore, NodeCounters
from hubnode.dedup import RecentIds
from hubnode.errors import JOIN_ERRORS, CloseCode, ErrorCode
from hubnode.frames import Frame
from hubnode.history import Opening, StreamKeeper
from hubnode.membership.base import Member, MembershipStore, NodeInfo, Presence, Stats
from hubnode.membership.memory import MemoryMembershipStore
from hubnode.protocol import Since, encode_error, encode_message, encode_positioned
from hubnode.routing import Change, RoutingTable
from hubnode.subscriptions import Subscriptions
from hubnode.supervisor import Supervisor
from hubnode.wire import ServerType, SystemEvent
from publisher.control import Command, command_of, pack_command
from publisher.envelope import Envelope, EnvelopeError, pack, position_of, unpack
from publisher.history import History
from publisher.keys import Keys
from publisher.message import RESERVED_TYPES, Message, MessageError
from publisher.targets import Target, coerce_message, pack_for

__all__ = ["MetricsSource", "MetricsStore", "Node", "NodeCounters", "NodeDraining", "Refused"]

log = logging.getLogger(__name__)

PING_FRAME = b"\x89\x00"  # an empty WebSocket ping, the same bytes for every socket


def reconnect_frame() -> Frame:
    """docs/protocol.md's notice before close 1001: a Message like any other, so it has its timestamp."""
    return encode_message(Message(ServerType.SYSTEM_MESSAGE, {"event": SystemEvent.RECONNECT}).stamped())

ConnRef = Connection | str


class NodeDraining(RuntimeError):
    """A connection arrived while the node began to drain."""


class Refused(Exception):
    """A handshake the node will not take: the HTTP status and reason to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Node:
    """One hub node. Construct, `await start()`, serve, `await drain()`."""

    def __init__(self, config: Config | None = None, *, broker: Broker | None = None,
                 store: MembershipStore | None = None, authenticate: Authenticate | None = None,
                 authorize: Authorize | None = None) -> None:
        """`authenticate`/`authorize` replace the built-in hooks of hubnode.auth.

        With `config.redis_url` the node runs on Redis (broker and store built
        from the config, unless given); without it, alone on the embedded ones.
        """
        self.config = config or Config()
        self.authenticate = checked_user_ids(authenticate) if authenticate else builtin_authenticate(self.config)
        self.authorize = authorize or builtin_authorize(self.config)
        self.id = self.config.node_id
        self.keys = Keys(self.config.key_prefix)
        if self.config.redis_url is not None and (broker is None or store is None):
            from hubnode.cluster import redis_parts

            redis_broker, redis_store = redis_parts(self.config)
            broker, store = broker or redis_broker, store or redis_store
        address = f"{self.config.host}:{self.config.port}"
        self.broker: Broker = broker if broker is not None else MemoryBroker()
        self.store: MembershipStore = (store if store is not None else MemoryMembershipStore(
            self.id, address=address, version=__version__, announce=self._announce))
        if isinstance(self.store, MemoryMembershipStore) and self.store.announce is None:
            self.store.announce = self._announce  # an embedded store handed in announces like the default
        self.supervisor = Supervisor()
        self.table = RoutingTable(self.keys)
        self.conns: dict[str, Connection] = {}
        self.counters = NodeCounters()
        self.draining = False
        self.started_at = time.time()
        self._all = self.keys.all
        self._own = self.keys.node_channel(self.id)
        self._subs = Subscriptions(self.broker, self.table.in_use, self.config.unsubscribe_grace,
                                   pinned=(self._all, self._own), supervisor=self.supervisor)
        self._recent = RecentIds(self.config.dedup_window)
        self._seq = itertools.count(1)
        self.flusher = Flusher()  # one write per socket per loop iteration (write coalescing)
        self._updates: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._reconnects_seen = 0  # the broker's reconnect count when membership was last reconciled
        self._openings: dict[str, Opening] = {}  # admitted connections' user-stream reads, until attach
        self._held: dict[str, list[Command]] = {}  # control commands for admitted connections, until attach
        self.history = StreamKeeper(self.broker, self.keys, self.config.history, fan_out=self._fan_out,
                                    frame_of=self._frame_of, resync=self._resync_conns, track=self._track,
                                    subscribers=self.table.subscribers)
        self.latency_observer: Callable[[float], None] | None = None
        self.metrics_source: MetricsSource | None = None
        """Set by the app (create_app): in Redis mode the node stores it every heartbeat for the dashboard."""

    # -- life cycle ----------------------------------------------------------
    async def start(self) -> None:
        """Connect the broker and the store; afterwards the node can take clients."""
        await self.broker.start(self.on_message, self.on_resync, wanted=self._subs.wanted,
                                supervisor=self.supervisor)
        if not self.broker.connected:
            log.warning("broker unreachable at start: serving, not ready, until it connects")
        await self.store.start(self.table.connections, self.supervisor)
        self.supervisor.spawn("heartbeat", self._heartbeat_loop)
        if self.metrics_source is not None and isinstance(self.store, MetricsStore):
            self.supervisor.spawn("metrics", self._metrics_loop)
        if self.config.ping_interval > 0:
            self.supervisor.spawn("ping", self._ping_loop)
        log.info("node %s started (%s broker)", self.id, type(self.broker).__name__)

    @property
    def ready(self) -> bool:
        """True when new clients may connect: broker up, registered, every task running, not draining."""
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.broker.connected:
            return "broker unreachable"
        if not self.store.ready:
            return "not registered in the membership store yet"
        if not self.supervisor.healthy:
            return "task down: " + ", ".join(sorted(self.supervisor.down))
        return None

    async def drain(self, timeout: float | None = None) -> None:
        """docs/protocol.md: tell clients to reconnect, close 1001, remove our entries."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        deadline = time.monotonic() + (timeout if timeout is not None else self.config.drain_timeout)
        log.info("node %s draining %d connections", self.id, len(self.conns))
        conns = list(self.conns.values())
        notice = reconnect_frame()
        for conn in conns:
            conn.send(notice)
        closers = [asyncio.create_task(c.close(CloseCode.GOING_AWAY, "node shutting down"))
                   for c in conns]
        if closers:
            await asyncio.wait(closers, timeout=max(0.1, deadline - time.monotonic() - 1.0))
        await self._wait_for(lambda: not self.conns, deadline - 0.5)
        if self._updates:
            await asyncio.wait(self._updates, timeout=max(0.1, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                await self._stop_services()
        except TimeoutError:
            log.warning("node %s: drain timeout reached before its Redis entries were removed; "
                        "the other nodes sweep them", self.id)
        finally:  # however the drain ended (timeout, error, cancel), stop everything and release waiters
            try:
                async with asyncio.timeout(2.0):
                    await self.broker.close()
                    await self.supervisor.close(1.0)
            except Exception:
                log.warning("node %s: stopping the broker failed", self.id, exc_info=True)
            finally:
                self._stopped.set()
                log.info("node %s stopped", self.id)

    async def _stop_services(self) -> None:
        await self.supervisor.stop("metrics")  # before the store deletes the snapshot and closes its client
        await self.supervisor.stop("heartbeat")
        await self.supervisor.stop("ping")
        await self._subs.close()
        try:
            await self.store.close()
        except Exception:
            log.warning("could not remove this node's membership entries", exc_info=True)

    async def _wait_for(self, predicate: Any, deadline: float) -> None:
        while not predicate() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _heartbeat_loop(self) -> None:
        """A failed heartbeat is a warning (the node may be swept soon), never the end of the loop."""
        while True:
            await asyncio.sleep(self.config.heartbeat)
            try:
                # a bound for any store; the Redis store also bounds each call by --redis-timeout
                async with asyncio.timeout(max(3 * self.config.heartbeat, 4 * self.config.redis_timeout)):
                    await self.store.heartbeat()
            except Exception as exc:
                self.counters.heartbeat_failures += 1
                log.warning("heartbeat failed (%s): %s", type(exc).__name__, exc)

    async def _metrics_loop(self) -> None:
        """Store this node's metrics snapshot at once, then every heartbeat.

        Any node can then serve the whole cluster's numbers to a dashboard,
        whichever node a load balancer sends the page's requests to.
        """
        while True:
            await self._share_metrics()
            await asyncio.sleep(self.config.heartbeat)

    async def _share_metrics(self) -> None:
        """One snapshot; a failure is a warning (the dashboard lacks this node for a while), never the end."""
        store, source = self.store, self.metrics_source
        if source is None or not isinstance(store, MetricsStore):
            return
        try:
            # a bound for any store; the Redis store also bounds the call by --redis-timeout
            async with asyncio.timeout(2 * self.config.redis_timeout):
                await store.put_metrics(orjson.dumps(source()))
        except Exception as exc:
            self.counters.metrics_failures += 1
            log.warning("storing the metrics snapshot failed (%s): %s", type(exc).__name__, exc)

    async def _ping_loop(self) -> None:
        """One task pings every socket; a peer silent past interval + timeout is dropped.

        Any frame from the client counts as a sign of life, so busy clients are
        never pinged needlessly and the loop does no per-socket awaiting.
        """
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        while True:
            await asyncio.sleep(min(interval, timeout) / 2)
            now = time.monotonic()  # the clock of Connection.last_seen
            for conn in list(self.conns.values()):
                if now - conn.last_seen > interval + timeout:
                    log.info("closing %s: no answer to ping for %.0fs", conn.id, now - conn.last_seen)
                    conn.abort()
                elif now - conn.last_seen >= interval and now - conn.last_ping >= interval:
                    conn.last_ping = now
                    conn.send_raw(PING_FRAME)

    # -- connections ---------------------------------------------------------
    def next_conn_id(self) -> str:
        return f"{self.id}:{next(self._seq)}"

    async def admit(self, identity: Identity, since: Since | None = None) -> str:
        """Reserve a connection for `identity` before the upgrade; returns its conn id.

        Both connection limits are checked after the reservation is made, never
        before (check-then-act would let concurrent handshakes all pass): the
        routing table counts the new connection at once, for `--max-connections`
        and for this node's share of the user's connections, and the store
        checks and counts the user cluster-wide in one atomic step. On return
        the connection is routable cluster-wide (its user channel confirmed);
        `attach` makes it live. When the user's stream keeps history it is read
        here (recovering from `since`), so a stream that cannot be read refuses
        the connection before the upgrade. Raises Refused, BrokerUnavailable or NodeDraining.
        The newest connection is the one refused: an attacker holding a stolen
        token cannot push the rightful user's open sessions out.
        """
        cfg, user = self.config, identity.user_id
        if self.draining:
            raise Refused(503, "node draining")
        if cfg.max_connections and len(self.table) >= cfg.max_connections:
            raise Refused(503, "node over its connection limit")
        limit = cfg.max_connections_per_user if user is not None else 0
        if limit and self.table.user_count(user) >= limit:  # type: ignore[arg-type]
            raise Refused(429, "too many connections for this user")
        conn_id = self.next_conn_id()
        change = self.table.add(conn_id, user)
        counted = False
        user_channel = self.keys.user_channel(user) if user is not None else None
        history = user is not None and self.history.covers("user", user)
        if history:
            self.history.expect(user_channel, conn_id)  # type: ignore[arg-type]
        try:
            await self._subs.apply(change, confirm=[user_channel] if user_channel is not None else ())
            if history:
                self._openings[conn_id] = await self.history.open("user", user, conn_id, since)  # type: ignore[arg-type]
            added = await self.store.add_connection(conn_id, user, limit)
            counted = added is not False
            if added is False:
                raise Refused(429, "too many connections for this user")
            if added is None and limit:  # the cluster-wide count cannot be checked now: do not guess
                raise Refused(503, "membership store unavailable: cannot check the per-user limit")
            if self.draining:
                raise NodeDraining("node draining")
        except BaseException:
            self._release(conn_id, user, counted)
            raise
        return conn_id

    def attach(self, conn: Connection, since: Since | None = None) -> None:
        """Make an admitted connection live: it joins the fan-out and gets `connected` first.

        Raises NodeDraining when a drain began since `admit` (the reservation
        is then released).
        """
        if self.draining:
            self._release(conn.id, conn.user_id, True)
            raise NodeDraining("node draining")
        self.conns[conn.id] = conn
        data: dict[str, Any] = {"conn_id": conn.id, "user_id": conn.user_id, "node": self.id}
        opening = self._openings.pop(conn.id, None)
        if opening is None:
            if since is not None and conn.user_id is not None:
                data["recovered"] = False  # the user's stream keeps no history on this node
            conn.send(encode_message(Message(ServerType.CONNECTED, data).stamped()))
            self._apply_held(conn)
            return

        def connected(position: dict[str, Any]) -> None:
            conn.send(encode_message(Message(ServerType.CONNECTED, {**data, **position}).stamped()))
        # `connected`, then what the user's stream missed, then its live messages
        self.history.finish(opening, conn, connected, answer_first=True)
        self._apply_held(conn)

    def _apply_held(self, conn: Connection) -> None:
        """Commands that arrived while the connection's handshake was under way act on it now it is live."""
        for command in self._held.pop(conn.id, ()):
            self._act(conn, command)

    def abandon(self, conn_id: str, user_id: str | None) -> None:
        """Give back an admitted connection that never became live (the upgrade failed)."""
        if conn_id in self.table and conn_id not in self.conns:
            self._release(conn_id, user_id, True)

    def _release(self, conn_id: str, user_id: str | None, counted: bool) -> asyncio.Task[None] | None:
        """Take a connection out of the table and, if it was counted, out of the store (in a tracked task)."""
        change = self.table.remove(conn_id)
        self._held.pop(conn_id, None)
        if self.config.history.enabled:  # catching-up state exists only with history
            self._openings.pop(conn_id, None)
            channels = [self.keys.room_channel(room) for room in change.rooms]
            if user_id is not None:
                channels.append(self.keys.user_channel(user_id))
            self.history.forget(conn_id, channels)
        self._subs.release(change.release)
        self.history.released(change.release)
        if counted and not self._stopped.is_set():
            return self._track(self._store_remove(conn_id, user_id, change))
        return None

    async def disconnect(self, conn: Connection) -> None:
        """Forget a closed connection and wait for its store update."""
        update = self.lost(conn)
        if update is not None:
            await asyncio.shield(update)

    def lost(self, conn: Connection) -> asyncio.Task[None] | None:
        """Forget a closed connection: it leaves all rooms, here and in the store.

        The local tables change at once; the store update runs in a task of its
        own (returned), which a drain waits for.
        """
        if conn.id not in self.conns:
            return None
        if conn.slow:
            self.counters.slow_closes += 1
        self.conns.pop(conn.id, None)
        return self._release(conn.id, conn.user_id, True)

    def _track(self, coro: Any) -> asyncio.Task[None]:
        """Run a store update in a task of its own: a cancelled handler cannot lose it, a drain waits for it."""
        update: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._updates.add(update)
        update.add_done_callback(self._updates.discard)
        return update

    async def _store_remove(self, conn_id: str, user_id: str | None, change: Change) -> None:
        try:
            await self.store.remove_connection(conn_id, user_id, change.rooms, change.emptied)
        except Exception:
            log.warning("membership update for closed %s failed; the heartbeat reconciles it",
                        conn_id, exc_info=True)

    # -- rooms ---------------------------------------------------------------
    async def join(self, conn_id: str, room: str, since: Since | None = None,
                   ack: Callable[[dict[str, Any] | None], None] | None = None) -> ErrorCode | None:
        """Join; returns once the room channel is confirmed subscribed, or an error code.

        In a room with history the stream is read after the subscription is
        confirmed: what the connection missed since `since` is sent, then
        `ack(data)` is called with the position, then live messages follow
        (docs/protocol.md). `ack` is called only on success. Raises
        ValueError for a connection this node does not have.
        """
        if conn_id not in self.table:
            raise ValueError(f"no connection {conn_id!r} on this node")
        if not self.broker.connected:
            return ErrorCode.UNAVAILABLE
        joined = self.table.rooms_of(conn_id)
        if room not in joined and len(joined) >= self.config.max_rooms_per_conn:
            return ErrorCode.TOO_MANY_ROOMS
        channel = self.keys.room_channel(room)
        change = self.table.join(conn_id, room)
        history = self.history.covers("room", room)
        if history and not change.changed and since is None:
            # a member joining again: it keeps receiving as it was; the ack says where it is
            if ack is not None:
                ack(self.history.position_data(channel, conn_id))
            return None
        was = self.history.expect(channel, conn_id) if history else None  # nothing live reaches it now
        opening: Opening | None = None
        added = False
        try:
            # the table says which channel is new; confirm waits for one another join has in flight
            await self._subs.apply(change, confirm=[channel])
            # a leave or a disconnect may have run while we waited for Redis
            if room in self.table.rooms_of(conn_id):
                if change.changed:
                    await self.store.add_member(room, conn_id, self.table.user_of(conn_id))
                    added = True
                if history:  # last: from the read to the ack nothing awaits
                    opening = await self.history.open("room", room, conn_id, since)
        except BrokerUnavailable:
            if added:  # the stream could not be read: undo the join, the store's part too
                await self.leave(conn_id, room)
            elif change.changed:
                self._leave_here(conn_id, room)
            else:  # a member asking again with `since`: it goes on from where it was
                self.history.restore(channel, self.conns.get(conn_id), was)
            return ErrorCode.UNAVAILABLE
        except BaseException:
            self.history.end_sync(channel, conn_id)
            raise
        conn = self.conns.get(conn_id)
        if opening is not None and conn is not None and room in self.table.rooms_of(conn_id):
            self.history.finish(opening, conn, ack or _ignore, answer_first=False)
            return None
        self.history.end_sync(channel, conn_id)
        if ack is not None:
            ack({"recovered": False} if since is not None and not history else None)
        return None

    def local_room_count(self) -> int:
        """Rooms with at least one member on this node."""
        return self.table.room_count()

    def rooms_of(self, conn_id: str) -> frozenset[str]:
        """The rooms a local connection is in (empty for an unknown one)."""
        return self.table.rooms_of(conn_id)

    async def leave(self, conn_id: str, room: str) -> None:
        change = self._leave_here(conn_id, room)
        if not change.changed:
            return
        try:
            await self.store.remove_member(room, conn_id, self.table.user_of(conn_id), bool(change.emptied))
        except Exception:
            log.warning("membership update for %s leaving %s failed", conn_id, room, exc_info=True)

    def _leave_here(self, conn_id: str, room: str) -> Change:
        """The local half of a leave: the table, the connection's catching-up state, the channel."""
        change = self.table.leave(conn_id, room)
        if change.changed:
            self.history.end_sync(self.keys.room_channel(room), conn_id)
            self._subs.release(change.release)
            self.history.released(change.release)
        return change

    # -- publishing and fan-out ------------------------------------------------
    async def publish(self, target: Target, msg: Message, exclude: str | None = None) -> int:
        """Publish through the broker; returns how many nodes took it (BrokerUnavailable)."""
        packed = pack_for(target, msg.stamped(), self.id, self.keys, exclude)
        self.counters.published += 1
        return await self.history.publish(target, packed)

    def on_message(self, channel: str, payload: bytes) -> None:
        """Broker callback: deliver one publication to the local connections it targets."""
        try:
            env = unpack(payload)
        except EnvelopeError as exc:
            self.counters.dropped += 1
            log.debug("dropped a payload on %s: %s", channel, exc)
            self._skip(channel, position_of(payload))
            return
        if env.control is not None:
            self._on_control(channel, env)
            return
        if channel == self._own:
            return  # the node's own channel: its liveness probe, nothing for clients
        if env.msg.type in RESERVED_TYPES:
            if env.offset is not None and env.epoch is not None:
                self._skip(channel, (env.offset, env.epoch))
            self.counters.reserved += 1  # a forged ack/error/pong could settle a client's pending request
            if self.counters.reserved % 1000 == 1:  # the first, then one line per 1,000: no log flood
                log.warning("dropped a %r message from %s on %s: the type is reserved for the node "
                            "(%d dropped so far)", env.msg.type, env.origin, channel, self.counters.reserved)
            return
        if env.offset is not None and env.epoch is not None and self.history.streams.tracked(channel):
            if not self.history.on_live(channel, env.offset, env.epoch, env):
                return  # delivered already, or held until the stream is read (docs/protocol.md)
        if self._recent.seen(env.id, time.monotonic()):
            self.counters.duplicates += 1  # a publisher's retry of an envelope already delivered
            return
        self._fan_out(channel, env)

    def _skip(self, channel: str, position: tuple[int, str] | None) -> None:
        """A positioned message nobody gets still takes its offset, or the next would look like a gap."""
        if position is not None and self.history.streams.tracked(channel):
            self.history.on_live(channel, position[0], position[1], None)

    def _frame_of(self, channel: str, env: Envelope) -> Frame | None:
        """The client frame of an envelope; None when it cannot be written as JSON."""
        msg = env.msg
        if msg.room is None and channel != self._all:
            # A publisher in another language may leave `room` out; the client
            # still has to know which room the message came through.
            parsed = self.keys.parse_channel(channel)
            if parsed is not None and parsed[0] == "room":
                msg = replace(msg, room=parsed[1])
        try:
            if env.offset is not None and env.epoch is not None:
                return encode_positioned(msg, env.offset, env.epoch)
            return encode_message(msg)
        except orjson.JSONEncodeError:  # e.g. nesting deeper than JSON output allows
            self.counters.dropped += 1
            return None

    def _fan_out(self, channel: str, env: Envelope) -> None:
        """Encode once, write the same bytes to every local target, awaiting none."""
        frame = self._frame_of(channel, env)
        if frame is None:
            return
        exclude = env.exclude
        sent = 0
        if channel == self._all:
            for conn in self.conns.values():
                if conn.id != exclude and conn.send(frame):
                    sent += 1
        else:
            conns = self.conns
            syncing = self.history.streams.syncing(channel) if env.offset is not None else None
            if syncing is None:
                for conn_id in self.table.subscribers(channel):
                    target = conns.get(conn_id)
                    if target is not None and conn_id != exclude and target.send(frame):
                        sent += 1
            else:  # some connections are catching up on this stream: each takes what is above its floor
                passes, offset, epoch = self.history.streams.passes, env.offset, env.epoch or ""
                for conn_id in list(self.table.subscribers(channel)):
                    target = conns.get(conn_id)
                    if (target is not None and conn_id != exclude
                            and (conn_id not in syncing or passes(channel, conn_id, offset, epoch))  # type: ignore[arg-type]
                            and target.send(frame)):
                        sent += 1
        self.counters.delivered += sent
        self.counters.bytes_out += sent * len(frame.text)  # the JSON size: other forms are built only if asked
        if sent and env.ts is not None and self.latency_observer is not None:
            self.latency_observer(max(0.0, time.time() - env.ts))

    def on_resync(self) -> None:
        """Broker callback after a lost subscription: messages may be gone.

        Streams with history are read back from Redis and delivered by the
        node itself; only connections with a stream that has none (or could
        not be recovered), or that is in a room announcing presence (its
        events are never stored, so missed ones cannot be replayed), are
        told to `resync` (docs/protocol.md).
        Without history on this node, every connection is told. The node's
        membership entries are rewritten at the next heartbeat too: the loss
        may have been a failover that dropped writes not yet replicated.
        """
        reconnects = self.broker.counters.reconnects
        if reconnects != self._reconnects_seen:  # a real reconnect, not a hand-off overflow
            self._reconnects_seen = reconnects
            self.store.reconcile()
        if not self.config.history.enabled:
            self._resync_conns(list(self.conns))
            return
        channels = self.table.channels()
        without = set(self.history.on_resync(channels))
        # presence events are never stored: members of rooms that announce them may have missed some
        without.update(channel for channel in channels if self._announced(channel))
        self._resync_conns({conn_id for channel in without for conn_id in self.table.subscribers(channel)})

    def _announced(self, channel: str) -> bool:
        parsed = self.keys.parse_channel(channel)
        return parsed is not None and parsed[0] == "room" and self.config.announces(parsed[1])

    def _resync_conns(self, conn_ids: Any) -> None:
        frame = encode_message(Message(ServerType.SYSTEM_MESSAGE, {"event": SystemEvent.RESYNC}).stamped())
        for conn_id in conn_ids:
            conn = self.conns.get(conn_id)
            if conn is not None and conn.send(frame):
                self.counters.resyncs += 1

    # -- presence and server-side control (docs/protocol.md) --------
    async def _announce(self, room: str, event: str, user_id: str) -> None:
        """The embedded store's presence events (the Redis store's scripts publish their own)."""
        if not self.config.announces(room):
            return
        msg = Message("presence", {"event": event, "user_id": user_id}, room=room).stamped()
        try:
            await self.broker.publish(self.keys.room_channel(room), pack(Envelope(msg, self.id)))
        except BrokerUnavailable:  # only at shutdown for the embedded broker: nobody is left to tell
            log.debug("presence %s of %s in %s not announced: broker closed", event, user_id, room)

    def _on_control(self, channel: str, env: Envelope) -> None:
        """A control command from Redis: act on the local connections it names, once per envelope id.

        The connections it finds here are affected: live ones at once, and
        ones whose handshake is under way (admitted, not yet live) as soon as
        they go live, so a ban cannot miss a tab that was connecting. A
        connection that starts its handshake later is not affected.
        """
        try:
            command = command_of(env.control)
        except MessageError as exc:
            self.counters.dropped += 1
            log.warning("dropped a malformed control command from %s on %s: %s", env.origin, channel, exc)
            return
        if self._recent.seen(env.id, time.monotonic()):
            self.counters.duplicates += 1
            return
        self.counters.control[command.op] += 1
        if self.draining:
            return  # every connection is being closed with 1001 anyway
        if command.user is not None:
            found = list(self.table.subscribers(self.keys.user_channel(command.user)))
        else:
            found = [command.conn] if command.conn is not None and command.conn in self.table else []
        log.info("control %s from %s: %d local connection(s)", command.op, env.origin, len(found))
        for conn_id in found:
            conn = self.conns.get(conn_id)
            if conn is not None:
                self._act(conn, command)
            else:  # admitted, not live yet
                self._held.setdefault(conn_id, []).append(command)

    def _act(self, conn: Connection, command: Command) -> None:
        if command.op == "disconnect":
            _disconnect(conn, command)
        elif command.op == "join":
            self._track(self._server_join(conn, command.room or ""))
        else:
            self._track(self._server_leave(conn, command.room or ""))

    async def _server_join(self, conn: Connection, room: str) -> None:
        """A join the server decided: no token check, but the room limit; `joined` once it is routable.

        A leave that lands while the join waits for Redis (the client's own,
        or a server-side one) wins: no `joined` follows the `left`.
        """
        def joined(data: dict[str, Any] | None) -> None:
            if room not in self.table.rooms_of(conn.id):
                return
            position = {k: v for k, v in (data or {}).items() if k in ("offset", "epoch")}
            conn.send(encode_message(Message(ServerType.SYSTEM_MESSAGE, {"event": SystemEvent.JOINED, "room": room,
                                                                **position}).stamped()))
        try:
            error = await self.join(conn.id, room, None, joined)
        except ValueError:  # closed meanwhile
            return
        except Exception:  # never lost in a task nobody awaits
            log.warning("server-side join of %s to %s failed", conn.id, room, exc_info=True)
            error = ErrorCode.UNAVAILABLE
        if error is not None:
            conn.send(encode_error(error, f"server-side join of {room!r} refused: {JOIN_ERRORS[error]}", room=room))

    async def _server_leave(self, conn: Connection, room: str) -> None:
        await self.leave(conn.id, room)
        if conn.id in self.conns:
            left = {"event": SystemEvent.LEFT, "room": room}
            conn.send(encode_message(Message(ServerType.SYSTEM_MESSAGE, left).stamped()))

    async def control(self, command: Command) -> int:
        """Publish a command on the channel of what it acts on; the number of nodes that took it.

        Only the nodes holding the user (its user channel) or the connection
        (its node's channel) receive it, never every node. BrokerUnavailable
        when Redis is unreachable.
        """
        _, payload = pack_command(command, self.id)
        return await self.broker.publish(command.channel(self.keys), payload)

    async def presence(self, room: str) -> Presence:
        """Who is in `room`, cluster-wide (ValueError for a bad name, BrokerUnavailable)."""
        Target("room", room)  # validates the name
        return await self.store.presence(room)

    async def disconnect_user(self, user_id: str, reason: str = "", reconnect: bool = False) -> int:
        """Close every open connection of the user, cluster-wide (4000, or 4001 with `reconnect`)."""
        return await self.control(Command("disconnect", user=user_id, reason=reason, reconnect=reconnect))

    async def disconnect_connection(self, conn_id: str, reason: str = "", reconnect: bool = False) -> int:
        """Close one connection, wherever it is."""
        return await self.control(Command("disconnect", conn=conn_id, reason=reason, reconnect=reconnect))

    async def join_user(self, user_id: str, room: str) -> int:
        """Join every open connection of the user to `room` (the token's rooms claim does not apply)."""
        return await self.control(Command("join", user=user_id, room=room))

    async def leave_user(self, user_id: str, room: str) -> int:
        """Take every open connection of the user out of `room`."""
        return await self.control(Command("leave", user=user_id, room=room))

    # -- the Hub API (mirrors the seed's Hub) -----------------------------------
    async def broadcast_to_all(self, msg: Message | dict[str, Any]) -> int:
        return await self.publish(Target("all"), coerce_message(msg))

    async def broadcast_to_room(self, room: str, msg: Message | dict[str, Any]) -> int:
        return await self.publish(Target("room", room), coerce_message(msg))

    async def broadcast_to_user(self, user_id: str, msg: Message | dict[str, Any]) -> int:
        return await self.publish(Target("user", user_id), coerce_message(msg))

    async def join_room(self, conn: ConnRef, room: str) -> None:
        """Join a local connection to a room; raises ValueError or BrokerUnavailable."""
        Target("room", room)  # validates the name
        error = await self.join(_conn_id(conn), room)
        if error is ErrorCode.UNAVAILABLE:
            raise BrokerUnavailable("broker unreachable")
        if error is not None:
            raise ValueError(error.value)

    async def leave_room(self, conn: ConnRef, room: str) -> None:
        await self.leave(_conn_id(conn), room)

    async def client_count(self) -> int:
        return sum(node.clients for node in await self.store.nodes())  # no room listing needed

    async def room_count(self) -> int:
        return (await self.store.stats()).rooms

    async def room_clients(self, room: str) -> list[Member]:
        return await self.store.members(room)

    async def rooms(self) -> dict[str, int]:
        return await self.store.rooms()

    async def stats(self) -> Stats:
        return await self.store.stats()

    async def nodes(self) -> list[NodeInfo]:
        return await self.store.nodes()

    async def stream_history(self, kind: str, name: str, since: int = 0, limit: int = 100) -> History:
        """A room's or user's history as `GET /api/rooms/<room>/history` answers it (BrokerUnavailable)."""
        return await self.history.history(kind, name, since, limit)

    async def stored_metrics(self, node_ids: Sequence[str]) -> dict[str, bytes]:
        """Other nodes' latest snapshots as stored in Redis (JSON bytes); none on a single node."""
        if not node_ids or not isinstance(self.store, MetricsStore):
            return {}
        return await self.store.node_metrics(node_ids)


def _disconnect(conn: Connection, command: Command) -> None:
    """The `disconnect` system message, then close 4000 (stay away) or 4001 (reconnect)."""
    farewell = {"event": SystemEvent.DISCONNECT, "reason": command.reason, "reconnect": command.reconnect}
    conn.send(encode_message(Message(ServerType.SYSTEM_MESSAGE, farewell).stamped()))
    code = CloseCode.DISCONNECTED_RECONNECT if command.reconnect else CloseCode.DISCONNECTED
    conn.close_soon(code, command.reason)  # close_frame cuts it to a control frame's 123 bytes


def _ignore(data: dict[str, Any] | None) -> None:
    """The ack of a join nobody answers (the Hub API's join_room)."""


def _conn_id(conn: ConnRef) -> str:
    return conn if isinstance(conn, str) else conn.id
