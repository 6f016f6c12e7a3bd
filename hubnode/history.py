"""The node's side of stream history (PROTOCOL.md section 10): publish, recover, replay, read.

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
from hubnode.protocol import Since
from hubnode.streams import Item, Position, Streams, Verdict, merge
from publisher.envelope import Envelope, EnvelopeError, unpack
from publisher.history import History, HistoryPolicy, StreamRead, StreamRef, history_of, stream_of
from publisher.keys import Keys
from publisher.targets import Packed, Target

__all__ = ["Opening", "Since", "StreamKeeper"]

log = logging.getLogger(__name__)

_RECOVERY_CONCURRENCY = 16


@dataclass(slots=True)
class Opening:
    """A connection's read of one stream, between the read and the answer to the client."""

    channel: str
    conn_id: str
    read: StreamRead
    since: Since | None
    recovered: bool
    entries: list[Item]
    asked: bool = True  # False: `since` is where a member already was (a repeated join), not the client's

    def answer(self, last: int) -> dict[str, Any]:
        """The ack's (or `connected`'s) history data."""
        data: dict[str, Any] = {"offset": last, "epoch": self.read.epoch}
        if self.since is not None and self.asked:
            data = {"recovered": self.recovered, **data}
        return data


Fanout = Callable[[str, Envelope], None]
FrameOf = Callable[[str, Envelope], "bytes | None"]
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
    def on_live(self, channel: str, env: Envelope) -> bool:
        """For a positioned message of a tracked channel: True to fan it out now."""
        assert env.offset is not None and env.epoch is not None
        verdict = self.streams.live(channel, env.offset, env.epoch, env)
        if verdict is Verdict.DELIVER:
            return True
        if verdict is Verdict.GAP:
            log.info("gap on %s before offset %d: reading the missed messages from the stream", channel, env.offset)
            self._track(self._recover(channel))
        return False

    # -- a connection joins or connects ---------------------------------------------------
    def expect(self, channel: str, conn_id: str) -> Position | None:
        """Call right after the routing table made the connection a member, before any await:
        from then until `finish`, its live messages of the channel are buffered, not sent.

        Returns where an existing member already was (for `open`), else None.
        """
        was = self.streams.conn_position(channel, conn_id)
        self.streams.begin_sync(channel, conn_id)
        return was

    def end_sync(self, channel: str, conn_id: str) -> None:
        self.streams.end_sync(channel, conn_id)

    async def open(self, kind: str, name: str, conn_id: str, since: Since | None,
                   where: Position | None = None) -> Opening:
        """Read the stream for a connection that is `expect`ed and whose channel is confirmed subscribed.

        A member joining again without `since` continues from where it is:
        what was in flight to it is read back, not lost to the buffer.
        Raises BrokerUnavailable; the caller then calls `end_sync`.
        """
        ref = self.ref(kind, name)
        asked = since is not None
        if since is None and where is not None:
            since = Since(where.offset, where.epoch)
        read = await self.broker.read_stream(ref, since.offset if since is not None else -1, 0, create=self.policy)
        recovered = since is not None and read.recovers(since.offset, since.epoch)
        entries = _decode(read.payloads) if recovered else []
        return Opening(ref.channel, conn_id, read, since, recovered, entries, asked)

    def finish(self, opening: Opening, conn: Connection, answer: Callable[[dict[str, Any]], None],
               answer_first: bool) -> None:
        """Send the replay and the answer (join: replay, ack; connect: connected, replay), then the buffer.

        Synchronous from the first byte to the floor, so nothing interleaves.
        """
        channel, streams = opening.channel, self.streams
        buffered = streams.buffered(channel, conn.id)
        if buffered is None:  # the buffer overflowed while the read was in flight (or the sync is gone)
            streams.end_sync(channel, conn.id)
            conn.close_soon(CloseCode.TRY_AGAIN_LATER, "too many messages while catching up")
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

    def _send(self, conn: Connection, channel: str, env: Envelope) -> None:
        if env.exclude == conn.id:
            return
        frame = self._frame_of(channel, env)
        if frame is not None:
            conn.send(frame)

    # -- connections and channels going away ---------------------------------------------
    def released(self, channels: Iterable[str]) -> None:
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
        """Read what `channel` missed since the node's position, deliver it and what was held, in order."""
        self.recoveries += 1
        ref = self._ref_of(channel)
        read: StreamRead | None = None
        start: Position | None = None
        failed = False
        while ref is not None:
            start = self.streams.recovery_start(channel)
            if start is None:
                break
            try:
                read = await self.broker.read_stream(ref, start.offset, 0)
            except BrokerUnavailable as exc:
                log.warning("could not read %s to recover it (%s): its connections get resync", channel, exc)
                failed = True
                break
            if not self.streams.read_again(channel):
                break
        lost = failed or (start is not None and (read is None or not read.recovers(start.offset, start.epoch)))
        entries = _decode(read.payloads) if read is not None and not lost else []
        if lost:
            self.unrecovered += 1
            members = set(self._subscribers(channel)) - self.streams.catching_up(channel)
            held = self.streams.end_recovery(channel, lost=True)
            self._resync(members)
        else:
            held = self.streams.end_recovery(channel, lost=False)
        self.recovered_messages += len(entries)
        for _, _, env in entries:
            self._live_again(channel, env)
        for _, _, env in held:
            self._live_again(channel, env)

    def _live_again(self, channel: str, env: Envelope) -> None:
        if self.streams.tracked(channel) and self.on_live(channel, env):
            self._fan_out(channel, env)

    # -- history reads ------------------------------------------------------------------
    async def history(self, kind: str, name: str, since: int, limit: int) -> History:
        ref = self.ref(kind, name)
        return history_of(await self.broker.read_stream(ref, since, limit), ref)


def _decode(payloads: Iterable[bytes]) -> list[Item]:
    items: list[Item] = []
    for payload in payloads:
        try:
            env = unpack(payload)
        except EnvelopeError:
            continue
        if env.offset is not None and env.epoch is not None:
            items.append((env.offset, env.epoch, env))
    return items
