"""The node's side of stream history (docs/protocol.md): publish, recover, replay, read.

The bookkeeping is pure (`hubnode.streams`); this module does the I/O around
it: it publishes rooms and users through the broker's stream step, reads a
stream when a connection joins or connects and replays what it missed, and,
when the node's subscriber was lost, reads what the node's own streams missed
and delivers it to the node's connections itself. The node hands it three
callables (fan one message out, build a frame, send `resync` to some
connections) and never lets it see sockets otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hubnode.broker.base import Broker, BrokerUnavailable
from hubnode.connection import Connection
from hubnode.errors import CloseCode
from hubnode.frames import Frame
from hubnode.protocol import Since
from hubnode.streams import Item, Position, Streams, Verdict, contiguous, merge
from publisher.envelope import Envelope
from publisher.history import History, HistoryPage, HistoryPolicy, StreamRead, StreamRef, stored, stream_of
from publisher.keys import Keys
from publisher.targets import Packed, Target

__all__ = ["Opening", "Since", "StreamKeeper"]

log = logging.getLogger(__name__)

_RECOVERY_CONCURRENCY = 16
_READS = 3  # reads of one join's stream when messages keep being lost under it


@dataclass(slots=True)
class Opening:
    """A connection's read of one stream, between the read and the answer to the client."""

    channel: str
    conn_id: str
    read: StreamRead
    since: Since | None
    recovered: bool
    entries: list[Item]

    def answer(self, last: int) -> dict[str, Any]:
        """The ack's (or `connected`'s) history data."""
        data: dict[str, Any] = {"offset": last, "epoch": self.read.epoch}
        if self.since is not None:
            data = {"recovered": self.recovered, **data}
        return data


Fanout = Callable[[str, Envelope], None]
FrameOf = Callable[[str, Envelope], "Frame | None"]
Resync = Callable[[Iterable[str]], None]
Track = Callable[[Any], "asyncio.Task[None]"]


class StreamKeeper:
    """History for one node: which streams it keeps, and every read and replay."""

    def __init__(self, broker: Broker, keys: Keys, policy: HistoryPolicy, *, fan_out: Fanout,
                 frame_of: FrameOf, resync: Resync, track: Track, subscribers: Callable[[str], Iterable[str]]
                 ) -> None:
        self.broker = broker
        self.keys = keys
        self.policy = policy
        self.streams = Streams()
        self.recoveries = 0
        self.recovered_messages = 0
        self.unrecovered = 0
        self._fan_out = fan_out
        self._frame_of = frame_of
        self._resync = resync
        self._track = track
        self._subscribers = subscribers
        self._refs: dict[str, StreamRef] = {}

    def ref(self, kind: str, name: str) -> StreamRef:
        return stream_of(self.keys, kind, name)

    def _ref_of(self, channel: str) -> StreamRef | None:
        ref = self._refs.get(channel)
        if ref is None:
            parsed = self.keys.parse_channel(channel)
            if parsed is None or parsed[0] not in ("room", "user"):
                return None
            ref = self._refs[channel] = self.ref(*parsed)
        return ref

    def covers(self, kind: str, name: str) -> bool:
        return self.policy.covers(kind, name)

    # -- publishing -----------------------------------------------------------------
    async def publish(self, target: Target, packed: Packed) -> int:
        """`all`: a plain PUBLISH; a room or user: the stream step, appending when the stream has history."""
        if target.kind == "all":
            return await self.broker.publish(packed.channel, packed.payload)
        return await self.broker.publish_stream(self.ref(target.kind, target.name), packed.payload, packed.id,
                                                self.policy.size_for(target), self.policy.ttl)

    # -- live messages ------------------------------------------------------------------
    def on_live(self, channel: str, offset: int, epoch: str, env: Envelope | None) -> bool:
        """For a positioned message of a tracked channel: True to fan it out now.

        `env` None marks a message that has a position but is delivered to
        nobody (it did not decode, or its type is the node's own): it still
        takes its offset, or the next message would look like a gap.
        """
        verdict = self.streams.live(channel, offset, epoch, env)
        if verdict is Verdict.DELIVER:
            return env is not None
        if verdict is Verdict.GAP:
            log.info("gap on %s before offset %d: reading the missed messages from the stream", channel, offset)
            self._track(self._recover(channel))
        return False

    # -- a connection joins or connects ---------------------------------------------------
    def expect(self, channel: str, conn_id: str) -> Position | None:
        """Call right after the routing table made the connection a member, before any await:
        from then until `finish`, its live messages of the channel are buffered, not sent.

        Returns where an existing member already was, else None.
        """
        was = self.streams.conn_position(channel, conn_id)
        self.streams.begin_sync(channel, conn_id)
        return was

    def end_sync(self, channel: str, conn_id: str) -> None:
        self.streams.end_sync(channel, conn_id)

    def position_data(self, channel: str, conn_id: str) -> dict[str, Any] | None:
        """A member's position for the ack of a repeated join without `since` (None when unknown)."""
        where = self.streams.conn_position(channel, conn_id)
        return None if where is None else {"offset": where.offset, "epoch": where.epoch}

    async def open(self, kind: str, name: str, conn_id: str, since: Since | None) -> Opening:
        """Read the stream for a connection that is `expect`ed and whose channel is confirmed subscribed.

        The read is repeated (up to 3 times) when the channel lost messages
        while it was in flight: the buffer of live messages would then have a
        hole that no later read fills. Raises BrokerUnavailable; the caller
        then calls `end_sync` (or `restore`).
        """
        ref = self.ref(kind, name)
        for _ in range(_READS):
            self.streams.untaint(ref.channel, conn_id)
            read = await self.broker.read_stream(ref, since.offset if since is not None else -1, 0,
                                                 create=self.policy)
            if self._whole(ref.channel, conn_id, read):
                break
        else:
            raise BrokerUnavailable(f"{ref.channel} kept losing messages while it was read")
        recovered = since is not None and read.recovers(since.offset, since.epoch)
        entries = _decode(read.payloads) if recovered else []
        return Opening(ref.channel, conn_id, read, since, recovered, entries)

    def _whole(self, channel: str, conn_id: str, read: StreamRead) -> bool:
        """Nothing was lost between the read and the live messages buffered for the connection."""
        buffered = self.streams.buffered(channel, conn_id)
        if buffered is None or self.streams.overflowed(channel, conn_id):
            return True  # nothing to check: `finish` decides
        return not self.streams.tainted(channel, conn_id) and contiguous(buffered, read.top, read.epoch or "")

    def finish(self, opening: Opening, conn: Connection, answer: Callable[[dict[str, Any]], None],
               answer_first: bool) -> None:
        """Send the replay and the answer (join: replay, ack; connect: connected, replay), then the buffer.

        Synchronous from the first byte to the floor, so nothing interleaves.
        """
        channel, streams = opening.channel, self.streams
        if streams.overflowed(channel, conn.id) or (answer_first and not self._whole(channel, conn.id, opening.read)):
            # too much arrived while it read, or messages were lost since the read (a connect's upgrade
            # ran in between): reconnecting with `since` recovers it, nothing here could
            streams.end_sync(channel, conn.id)
            conn.close_soon(CloseCode.TRY_AGAIN_LATER, "could not catch up: reconnect")
            return
        buffered = streams.buffered(channel, conn.id)
        if buffered is None:  # another join of this connection settled it meanwhile
            data = self.position_data(channel, conn.id) or {}
            answer({"recovered": False, **data} if opening.since is not None else data)
            return
        epoch = opening.read.epoch or ""
        start = opening.since.offset if opening.recovered and opening.since else opening.read.top
        merged = merge(opening.entries, buffered, start, epoch)
        if opening.recovered:
            self.recovered_messages += len(merged.replay)
        if answer_first:  # `connected`: the client's own offset, the replay follows above it (or the top)
            answer(opening.answer(start))
        floor = Position(epoch, merged.last)
        for _, _, env in merged.replay:
            self._send(conn, channel, env)
        if not answer_first:  # the ack: the last message of the stream sent before it
            answer(opening.answer(merged.last))
        for offset, item_epoch, env in merged.after:
            self._send(conn, channel, env)
            floor = Position(item_epoch, offset)
        streams.settle(channel, conn.id, floor)

    def restore(self, channel: str, conn: Connection | None, was: Position | None) -> None:
        """A member's join failed: send it what was buffered above where it was, and go on from there."""
        buffered = self.streams.buffered(channel, conn.id) if conn is not None else None
        if conn is None or buffered is None or was is None:
            if conn is not None:
                self.streams.end_sync(channel, conn.id)
            return
        merged = merge([], buffered, was.offset, was.epoch)
        floor = was
        for offset, item_epoch, env in merged.after:
            self._send(conn, channel, env)
            floor = Position(item_epoch, offset)
        self.streams.settle(channel, conn.id, floor)

    def _send(self, conn: Connection, channel: str, env: Envelope | None) -> None:
        if env is None or env.exclude == conn.id:
            return
        frame = self._frame_of(channel, env)
        if frame is not None:
            conn.send(frame)

    # -- connections and channels going away ---------------------------------------------
    def released(self, channels: Iterable[str]) -> None:
        for channel in channels:
            self._refs.pop(channel, None)
        self.streams.untrack(channels)

    def forget(self, conn_id: str, channels: Iterable[str]) -> None:
        self.streams.drop_conn(conn_id, channels)

    # -- the subscriber was lost -----------------------------------------------------------
    def on_resync(self, channels: Iterable[str]) -> set[str]:
        """Recover every tracked channel; returns the channels that have no history (their members resync)."""
        untracked: set[str] = set()
        recover: list[str] = []
        for channel in channels:
            if self.streams.tracked(channel):
                if self.streams.begin_recovery(channel):
                    recover.append(channel)
            else:
                untracked.add(channel)
        if recover:
            self._track(self._recover_all(recover))
        return untracked

    async def _recover_all(self, channels: list[str]) -> None:
        gate = asyncio.Semaphore(_RECOVERY_CONCURRENCY)

        async def one(channel: str) -> None:
            async with gate:
                await self._recover(channel)
        await asyncio.gather(*(one(channel) for channel in channels))

    async def _recover(self, channel: str) -> None:
        """Read what `channel` missed since the node's position, deliver it and what was held, in order.

        Whatever happens, the channel stops holding its live messages at the end.
        """
        self.recoveries += 1
        lost, entries = True, list[Item]()
        try:
            lost, entries = await self._read_missed(channel)
        finally:
            if lost:
                self.unrecovered += 1
                members = set(self._subscribers(channel)) - self.streams.catching_up(channel)
                held = self.streams.end_recovery(channel, lost=True)
                self._resync(members)
            else:
                held = self.streams.end_recovery(channel, lost=False)
            self.recovered_messages += len(entries)
            for offset, epoch, env in [*entries, *held]:
                self._live_again(channel, offset, epoch, env)

    async def _read_missed(self, channel: str) -> tuple[bool, list[Item]]:
        """(lost, entries above the position): lost when they cannot be read or left the window."""
        ref = self._ref_of(channel)
        while ref is not None:
            start = self.streams.recovery_start(channel)
            if start is None:  # nobody needs anything: unless a member's position is unknown
                return self.streams.members_unknown(channel, self._subscribers(channel)), []
            try:
                read = await self.broker.read_stream(ref, start.offset, 0)
            except BrokerUnavailable as exc:
                log.warning("could not read %s to recover it (%s): its connections get resync", channel, exc)
                return True, []
            if self.streams.read_again(channel):
                continue
            if not read.recovers(start.offset, start.epoch):
                return True, []
            return False, _decode(read.payloads)
        return True, []

    def _live_again(self, channel: str, offset: int, epoch: str, env: Envelope | None) -> None:
        if self.streams.tracked(channel) and self.on_live(channel, offset, epoch, env) and env is not None:
            self._fan_out(channel, env)

    # -- history reads ------------------------------------------------------------------
    async def history(self, kind: str, name: str, since: int, limit: int) -> History:
        """As `publisher.history.history_query`, over this node's broker (the embedded one too)."""
        page = HistoryPage(self.ref(kind, name), since, limit)
        while want := page.want():
            page.add(await self.broker.read_stream(page.ref, page.since, want))
        return page.result()


def _decode(payloads: Iterable[bytes]) -> list[Item]:
    """Stored envelopes as (offset, epoch, envelope or None), in order (`publisher.history.stored`)."""
    return [entry for entry in map(stored, payloads) if entry is not None]
