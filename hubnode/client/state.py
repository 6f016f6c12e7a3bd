"""What a client remembers across connections: stream positions and member lists.

Pure: no I/O, no event loop. `hubnode.client` feeds it the frames it gets and
asks it what to put in a join; it returns the `recovered` and `members`
events to hand the application. The rules are hub.js's (hubnode/static/hub.js),
so a Python client and a page behave alike:

- a stream's position is the last (offset, epoch) *delivered* to the
  application; a message at or below it in the same epoch is a duplicate (a
  replayed message's live copy) and is dropped: merge by offset, never by timing;
- a room joined on an earlier connection is re-joined with `since` its
  position, and the user's stream is recovered with `?since=` on connect;
- a member list is one presence query with the join/leave events that
  arrive meanwhile applied on top, in order (applying one twice changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hubnode.wire import PresenceEvent

__all__ = ["MemberLists", "Position", "Streams"]

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream with history was: the `offset` of its last message in `epoch`."""

    offset: int
    epoch: str

    @classmethod
    def of(cls, data: Any) -> Position | None:
        """The position a frame's `data` (or a message) carries, if it carries one."""
        if not isinstance(data, dict):
            return None
        offset, epoch = data.get("offset"), data.get("epoch")
        if isinstance(offset, int) and not isinstance(offset, bool) and isinstance(epoch, str):
            return cls(offset, epoch)
        return None


@dataclass(slots=True)
class _Stream:
    position: Position | None
    conn: int  # the connection it was last seen on
    acked: int = 0  # the connection whose join ack it last had


@dataclass(slots=True)
class _UserStream:
    user: str
    position: Position | None


class Streams:
    """The rooms a client wants to be in, and the position of each stream it reads."""

    def __init__(self) -> None:
        self.rooms: set[str] = set()  # re-joined after every reconnect
        self.conn = 0  # serial of the current connection: 1 after the first `connected`
        self._rooms: dict[str, _Stream] = {}
        self._user: _UserStream | None = None
        self._user_since: Position | None = None  # what the current attempt's URL carries

    def position(self, room: str | None = None) -> Position | None:
        """The last position delivered: of `room`, or of the user's own stream when None."""
        if room is None:
            return self._user.position if self._user else None
        stream = self._rooms.get(room)
        return stream.position if stream else None

    def forget(self, room: str) -> None:
        self.rooms.discard(room)
        self._rooms.pop(room, None)

    def connecting(self) -> Position | None:
        """A new attempt: the user stream's position, for the URL's `since`."""
        self._user_since = self._user.position if self._user else None
        return self._user_since

    def connected(self, info: dict[str, Any], had_earlier: bool, previous_user: Any) -> Event | None:
        """A `connected` frame's data: take the user stream's position.

        Returns the user stream's `recovered` event when this connection
        re-established the same user's stream (its missed messages follow the frame).
        """
        self.conn += 1
        sent, self._user_since = self._user_since, None
        user = info.get("user_id")
        had = self._user if self._user and self._user.user == user else None
        pos = Position.of(info)
        recovered = bool(sent and had and had.position and pos and info.get("recovered") is True
                         and pos.epoch == had.position.epoch)
        if not isinstance(user, str):
            self._user = None
        elif not recovered:
            self._user = _UserStream(user, pos)
        # else: keep the old position; the replayed messages (offsets above it) follow
        if self._user is None or not had_earlier or previous_user != user:
            return None
        return _recovered("user", None, recovered, self._user.position, user_id=user)

    def join_data(self, room: str, since: Position | None) -> tuple[Any, bool, Position | None]:
        """A join as it goes on the wire, whether it is a re-join, and the `since` it carries.

        With `since` when the room was joined on an earlier connection and has
        a position, else the one the application gave.
        """
        stream = self._rooms.get(room)
        rejoin = bool(stream and stream.conn != self.conn)
        sent = stream.position if stream and rejoin and stream.position else since
        if sent is None:
            return room, rejoin, None
        return {"room": room, "since": {"offset": sent.offset, "epoch": sent.epoch}}, rejoin, sent

    def joined(self, room: str, data: Any, rejoin: bool, sent: Position | None) -> Event | None:
        """A join's ack: the room's position from now on, and its `recovered` event, if any."""
        if room not in self.rooms:
            return None  # left meanwhile
        stream = self._stream(room)
        repeat = stream.acked == self.conn  # already in the room: the node may answer a bare ack
        stream.conn = stream.acked = self.conn
        pos = Position.of(data)
        if pos is not None:
            # Replayed messages came before the ack and moved the position already;
            # every later message is above pos. Not recovered: the stream starts over.
            old = stream.position
            ahead = (isinstance(data, dict) and data.get("recovered") is not False and old is not None
                     and old.epoch == pos.epoch and old.offset > pos.offset)
            if not ahead:
                stream.position = pos
        elif not repeat:
            stream.position = None  # no history (any more)
        if not rejoin and sent is None:
            return None
        recovered = bool(sent and isinstance(data, dict) and data.get("recovered") is True)
        return _recovered("room", room, recovered, stream.position)

    def server_joined(self, room: str, data: dict[str, Any]) -> None:
        """The server joined this connection to `room`: re-join it after a reconnect, from its position."""
        if room in self.rooms:
            return  # the application's own join: its position may be ahead already
        self.rooms.add(room)
        stream = self._stream(room)
        stream.conn = stream.acked = self.conn
        stream.position = Position.of(data)

    def track(self, frame: dict[str, Any]) -> bool:
        """A message: False when it was delivered already, else True (and its stream moves on)."""
        pos = Position.of(frame)
        if pos is None:
            return True
        room = frame.get("room")
        if room is not None:
            if room not in self.rooms and room not in self._rooms:
                return True  # not a room this client is in
            stream: _Stream | _UserStream = self._stream(room)
        elif self._user is not None:
            stream = self._user
        else:
            return True
        old = stream.position
        if old is not None and old.epoch == pos.epoch and pos.offset <= old.offset:
            return False
        stream.position = pos
        return True

    def _stream(self, room: str) -> _Stream:
        stream = self._rooms.get(room)
        if stream is None:
            stream = self._rooms[room] = _Stream(None, self.conn)
        return stream


def _recovered(stream: str, room: str | None, recovered: bool, pos: Position | None, **extra: Any) -> Event:
    return {"type": "recovered", "stream": stream, "room": room, **extra, "recovered": recovered,
            "offset": pos.offset if pos else None, "epoch": pos.epoch if pos else None}


@dataclass(slots=True)
class _Members:
    users: dict[str, int] | None = None  # None until the first answer
    anonymous: int = 0
    asking: int = 0  # serial of the query in flight, 0 when none
    serial: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


class MemberLists:
    """Each joined room's member list, for a client built with `presence=True`."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Members] = {}

    def members(self, room: str) -> dict[str, Any] | None:
        """{"users": {user: connections}, "anonymous": n}, or None before the first answer."""
        m = self._rooms.get(room)
        return _view(m) if m and m.users is not None else None

    def forget(self, room: str) -> None:
        self._rooms.pop(room, None)

    def ask(self, room: str) -> int:
        """A query is about to be sent: its serial. Events from now on wait for its answer."""
        m = self._rooms.setdefault(room, _Members())
        m.serial += 1
        m.asking = m.serial
        m.events = []
        return m.serial

    def current(self, room: str, serial: int) -> bool:
        m = self._rooms.get(room)
        return m is not None and m.asking == serial

    def answered(self, room: str, serial: int, users: dict[str, int], anonymous: int) -> Event | None:
        """The query's answer, with the events that came meanwhile applied: the `members` event."""
        if not self.current(room, serial):
            return None  # a later query (or a leave) overtook it
        m = self._rooms[room]
        m.users, m.anonymous = dict(users), anonymous
        return self._settle(room, m)

    def failed(self, room: str, serial: int) -> Event | None:
        """The query failed: apply what waited to the list known before, if any."""
        if not self.current(room, serial):
            return None
        return self._settle(room, self._rooms[room])

    def event(self, room: str, data: Any) -> Event | None:
        """A presence event: the `members` event, or None while a query is in flight or for no list."""
        m = self._rooms.get(room)
        if m is None or not isinstance(data, dict) or not isinstance(data.get("user_id"), str):
            return None
        if data.get("event") not in (PresenceEvent.JOIN, PresenceEvent.LEAVE):
            return None
        if m.asking:
            m.events.append(data)
            return None
        if m.users is None:
            return None
        _apply(m.users, data)
        return _members_event(room, m, {"event": data["event"], "user_id": data["user_id"]})

    def _settle(self, room: str, m: _Members) -> Event | None:
        m.asking = 0
        if m.users is None:
            return None
        for data in m.events:
            _apply(m.users, data)
        m.events = []
        return _members_event(room, m, None)


def _apply(users: dict[str, int], data: dict[str, Any]) -> None:
    if data["event"] == PresenceEvent.LEAVE:
        users.pop(data["user_id"], None)
    else:
        users.setdefault(data["user_id"], 1)


def _view(m: _Members) -> dict[str, Any]:
    return {"users": dict(m.users or {}), "anonymous": m.anonymous}


def _members_event(room: str, m: _Members, change: dict[str, Any] | None) -> Event:
    return {"type": "members", "room": room, "change": change, **_view(m)}
