"""Where each stream with history stands on this node, and per connection: merge by offset, never by timing.

Pure: no I/O. docs/protocol.md asks for no gap and no duplicate
between replayed and live messages, through joins, reconnects and subscriber
losses. Three facts make that work, and this module is their bookkeeping:

- Live messages of one channel arrive in offset order (one script assigns
  the offset and publishes, one subscriber connection reads them), so the
  node keeps one *position* per channel: the last offset it fanned out. A
  message at or below it is a repeat (the overlap of a recovery read and live
  traffic) and is dropped; one beyond position + 1 reveals a gap, and the
  channel is *recovered*: its live messages are *held* while the missing ones
  are read from the stream, then both are delivered in offset order.
- A connection that joins (or connects) reads the stream after its channel
  is subscribed. Until that read is done it is *buffering*: it gets every
  message of the channel into its own buffer and nothing on the socket, so
  its replay comes first. Then it is at a *floor* (the last offset it got):
  live copies of what it already got may still be in flight, and it skips
  them until the channel's messages pass the floor; after that it is plain.
- A position is learnt from live messages only, never from a read: a read
  can run ahead of messages still in flight, which other connections need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

__all__ = ["MAX_BUFFERED", "Merged", "Position", "Streams", "Verdict", "contiguous", "merge"]

MAX_BUFFERED = 10_000
"""Messages a buffering connection may collect while its read is in flight; past it, the connection
is closed with 1013 (try again later) and recovers on its next connect, rather than growing without bound."""


class Position(NamedTuple):
    epoch: str
    offset: int


class Verdict(Enum):
    DELIVER = "deliver"  # fan out now; the position advanced
    DROP = "drop"  # at or below the position: delivered already
    HOLD = "hold"  # the channel is being recovered: kept, delivered after the read
    GAP = "gap"  # beyond position + 1: kept; recover the channel


Item = tuple[int, str, Any]
"""(offset, epoch, whatever the I/O layer carries, e.g. the decoded envelope)."""


@dataclass(slots=True)
class _Sync:
    """A connection catching up on one channel: buffering (floor None) or at a floor."""

    buffer: list[Item] = field(default_factory=list)
    floor: Position | None = None
    overflowed: bool = False
    tainted: bool = False  # the channel lost messages while this connection was reading: read again


@dataclass(slots=True)
class _Channel:
    position: Position | None = None
    held: list[Item] | None = None  # not None while the channel is being recovered
    again: bool = False  # lost again during the recovery read: read once more
    syncs: dict[str, _Sync] = field(default_factory=dict)


class Merged(NamedTuple):
    """What a finished read means for one connection: send `replay`, answer, send `after`."""

    replay: list[Item]
    last: int  # the offset the answer (ack or connected) reports
    after: list[Item]


def merge(entries: Iterable[Item], buffered: Iterable[Item], start: int, epoch: str) -> Merged:
    """Replay `entries` above `start`, then the buffered live messages above what was replayed.

    `epoch` is the stream's epoch as read; a buffered message of another
    epoch came from a stream recreated since, and follows in arrival order.
    """
    replay = [item for item in entries if item[0] > start]
    last = replay[-1][0] if replay else start
    buffered = list(buffered)
    same = {item[0]: item for item in buffered if item[1] == epoch and item[0] > last}
    after = [same[offset] for offset in sorted(same)]
    seen: set[tuple[str, int]] = set()
    for item in buffered:
        if item[1] != epoch and (item[1], item[0]) not in seen:
            seen.add((item[1], item[0]))
            after.append(item)
    return Merged(replay, last, after)


class Streams:
    """The node's positions and catching-up connections, per channel with history."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}

    # -- which channels are tracked ------------------------------------------------
    def track(self, channel: str) -> None:
        """A channel with history that has (or is about to have) local members."""
        self._channels.setdefault(channel, _Channel())

    def untrack(self, channels: Iterable[str]) -> None:
        """Channels without local members: their position means nothing any more."""
        for channel in channels:
            self._channels.pop(channel, None)

    def tracked(self, channel: str) -> bool:
        return channel in self._channels

    def channels(self) -> list[str]:
        return list(self._channels)

    def position(self, channel: str) -> Position | None:
        state = self._channels.get(channel)
        return None if state is None else state.position

    # -- live messages -----------------------------------------------------------
    def live(self, channel: str, offset: int, epoch: str, item: Any) -> Verdict:
        """Decide about one positioned message of a tracked channel (live, held or recovered)."""
        state = self._channels[channel]
        for sync in state.syncs.values():
            if sync.floor is None:
                _buffer(sync, (offset, epoch, item))
        if state.held is not None:
            state.held.append((offset, epoch, item))
            return Verdict.HOLD
        pos = state.position
        if pos is not None and epoch == pos.epoch:
            if offset <= pos.offset:
                return Verdict.DROP
            if offset > pos.offset + 1:
                state.held = [(offset, epoch, item)]
                _taint(state)
                return Verdict.GAP
        state.position = Position(epoch, offset)
        return Verdict.DELIVER

    def syncing(self, channel: str) -> dict[str, _Sync] | None:
        """The channel's catching-up connections, or None (the fast path: plain fan-out)."""
        state = self._channels.get(channel)
        return state.syncs if state is not None and state.syncs else None

    def passes(self, channel: str, conn_id: str, offset: int, epoch: str) -> bool:
        """Whether a catching-up connection takes this fanned-out message (it may become plain)."""
        state = self._channels[channel]
        sync = state.syncs.get(conn_id)
        if sync is None:
            return True
        floor = sync.floor
        if floor is None:
            return False  # buffering: `live` put it in its buffer
        if epoch != floor.epoch or offset >= floor.offset:
            del state.syncs[conn_id]  # every later message is above the floor
            return epoch != floor.epoch or offset > floor.offset
        return False

    # -- a connection catching up --------------------------------------------------
    def begin_sync(self, channel: str, conn_id: str) -> None:
        """Before the read is sent: from now on the connection's messages of `channel` are buffered.

        A connection already buffering (another join of it in flight) keeps its buffer.
        """
        self.track(channel)
        syncs = self._channels[channel].syncs
        current = syncs.get(conn_id)
        if current is None or current.floor is not None:
            syncs[conn_id] = _Sync()

    def untaint(self, channel: str, conn_id: str) -> None:
        """Before each read of a catching-up connection."""
        sync = self._sync(channel, conn_id)
        if sync is not None:
            sync.tainted = False

    def tainted(self, channel: str, conn_id: str) -> bool:
        sync = self._sync(channel, conn_id)
        return sync is not None and sync.tainted

    def _sync(self, channel: str, conn_id: str) -> _Sync | None:
        state = self._channels.get(channel)
        return None if state is None else state.syncs.get(conn_id)

    def buffered(self, channel: str, conn_id: str) -> list[Item] | None:
        """The buffer of a buffering connection; None when it is not buffering (settled by another join)."""
        sync = self._sync(channel, conn_id)
        if sync is None or sync.floor is not None:
            return None
        return sync.buffer

    def overflowed(self, channel: str, conn_id: str) -> bool:
        sync = self._sync(channel, conn_id)
        return sync is not None and sync.overflowed

    def settle(self, channel: str, conn_id: str, floor: Position) -> None:
        """After the replay and the buffer went out: skip live copies up to `floor`, then go plain."""
        state = self._channels.get(channel)
        if state is None or conn_id not in state.syncs:
            return
        pos = state.position
        if pos is not None and pos.epoch == floor.epoch and pos.offset >= floor.offset:
            del state.syncs[conn_id]  # the channel is past the floor already
        else:
            state.syncs[conn_id] = _Sync(floor=floor)

    def conn_position(self, channel: str, conn_id: str) -> Position | None:
        """The last offset a member already got: its floor while it has one, else the channel's position.

        None while it is still reading, or when nothing is known.
        """
        state = self._channels.get(channel)
        if state is None:
            return None
        sync = state.syncs.get(conn_id)
        if sync is not None:
            return sync.floor
        return state.position

    def end_sync(self, channel: str, conn_id: str) -> None:
        state = self._channels.get(channel)
        if state is not None:
            state.syncs.pop(conn_id, None)

    def drop_conn(self, conn_id: str, channels: Iterable[str]) -> None:
        for channel in channels:
            self.end_sync(channel, conn_id)

    # -- recovering a channel --------------------------------------------------------
    def begin_recovery(self, channel: str) -> bool:
        """Hold the channel's live messages; False when a recovery is running (it reads again)."""
        state = self._channels.get(channel)
        if state is None:
            return False
        _taint(state)
        if state.held is not None:
            state.again = True
            return False
        state.held = []
        return True

    def recovery_start(self, channel: str) -> Position | None:
        """Where to read from: the position, else the lowest floor (nobody needs anything below)."""
        state = self._channels.get(channel)
        if state is None:
            return None
        state.again = False
        if state.position is not None:
            return state.position
        floors = [s.floor for s in state.syncs.values() if s.floor is not None]
        return min(floors, key=lambda p: p.offset) if floors else None

    def read_again(self, channel: str) -> bool:
        """True when the channel was lost again while it was read: read once more."""
        state = self._channels.get(channel)
        return state is not None and state.again

    def end_recovery(self, channel: str, lost: bool) -> list[Item]:
        """Stop holding; returns the held messages in arrival order, for `live` again.

        `lost`: the read could not recover the channel; the position is
        forgotten, so the next message is taken as it comes.
        """
        state = self._channels.get(channel)
        if state is None or state.held is None:
            return []
        held, state.held = state.held, None
        if lost:  # members are told to resync; floors stay: they still skip what a member already got
            state.position = None
        return held

    def members_unknown(self, channel: str, members: Iterable[str]) -> bool:
        """True when a member is plain while the position is unknown (after a failed recovery):
        nobody can say from where it would need to be recovered."""
        state = self._channels.get(channel)
        if state is None or state.position is not None:
            return False
        return any(conn_id not in state.syncs for conn_id in members)

    def catching_up(self, channel: str) -> set[str]:
        """Connections of `channel` that are buffering (they read again when their channel was lost)."""
        state = self._channels.get(channel)
        if state is None:
            return set()
        return {conn_id for conn_id, sync in state.syncs.items() if sync.floor is None}


def contiguous(buffered: Iterable[Item], top: int, epoch: str) -> bool:
    """Whether the live messages buffered above a read's `top` follow it without a hole.

    Live messages arrive in offset order, so a hole means some were lost on the
    way (a subscriber loss while the read was in flight): read again.
    """
    offsets = sorted({item[0] for item in buffered if item[1] == epoch and item[0] > top})
    return not offsets or offsets == list(range(top + 1, top + 1 + len(offsets)))


def _taint(state: _Channel) -> None:
    for sync in state.syncs.values():
        if sync.floor is None:
            sync.tainted = True


def _buffer(sync: _Sync, item: Item) -> None:
    if sync.overflowed:
        return
    if len(sync.buffer) >= MAX_BUFFERED:
        sync.overflowed = True
        sync.buffer = []
        return
    sync.buffer.append(item)
