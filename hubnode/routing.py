"""The node's local routing tables: connection <-> rooms, user -> connections.

Pure: no I/O. Every mutator returns a `Change` saying what the I/O layer must
do next (which channels to subscribe or release, whether a membership record
changed), the way a sans-I/O protocol returns the bytes to send. Fan-out reads
`subscribers(channel)`: one dict lookup per message.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from publisher.keys import Keys

__all__ = ["Change", "RoutingTable"]

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Change:
    """What one mutation means for the I/O layer.

    `subscribe`: channels that gained their first local member.
    `release`: channels that lost their last local member (unsubscribe later).
    `changed`: the membership record actually changed (False for a repeated
    join or a leave of a room the connection was not in).
    `rooms`: rooms the connection left.
    `emptied`: rooms of `rooms` in which this node has no member left (the
    node's crash-clean-up index in the store drops them).
    """

    subscribe: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    changed: bool = False
    rooms: tuple[str, ...] = ()
    emptied: tuple[str, ...] = ()


@dataclass(slots=True)
class _Conn:
    user_id: str | None
    rooms: set[str] = field(default_factory=set)


class RoutingTable:
    """Who is connected to this node and which channels reach them."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._conns: dict[str, _Conn] = {}
        self._channels: dict[str, set[str]] = {}  # channel -> conn ids
        self._rooms: dict[str, set[str]] = {}  # room -> conn ids
        self._users: dict[str, set[str]] = {}  # user id -> conn ids

    # -- mutators ------------------------------------------------------------
    def add(self, conn_id: str, user_id: str | None) -> Change:
        """Register a new connection; its user channel is needed if it has a user."""
        if conn_id in self._conns:
            raise ValueError(f"connection {conn_id} already registered")
        self._conns[conn_id] = _Conn(user_id)
        if user_id is None:
            return Change(changed=True)
        self._users.setdefault(user_id, set()).add(conn_id)
        channel = self.keys.user_channel(user_id)
        return Change(subscribe=self._attach(channel, conn_id), changed=True)

    def join(self, conn_id: str, room: str) -> Change:
        """Add `conn_id` to `room`; idempotent."""
        conn = self._conns[conn_id]
        if room in conn.rooms:
            return Change()
        conn.rooms.add(room)
        self._rooms.setdefault(room, set()).add(conn_id)
        return Change(subscribe=self._attach(self.keys.room_channel(room), conn_id), changed=True)

    def leave(self, conn_id: str, room: str) -> Change:
        """Remove `conn_id` from `room`; leaving a room not joined changes nothing."""
        conn = self._conns.get(conn_id)
        if conn is None or room not in conn.rooms:
            return Change()
        conn.rooms.discard(room)
        emptied = (room,) if _discard(self._rooms, room, conn_id) else ()
        return Change(release=self._detach(self.keys.room_channel(room), conn_id),
                      changed=True, rooms=(room,), emptied=emptied)

    def remove(self, conn_id: str) -> Change:
        """Forget a closed connection: it leaves every room and its user."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return Change()
        release: list[str] = []
        emptied: list[str] = []
        for room in sorted(conn.rooms):
            if _discard(self._rooms, room, conn_id):
                emptied.append(room)
            release.extend(self._detach(self.keys.room_channel(room), conn_id))
        if conn.user_id is not None:
            _discard(self._users, conn.user_id, conn_id)
            release.extend(self._detach(self.keys.user_channel(conn.user_id), conn_id))
        return Change(release=tuple(release), changed=True, rooms=tuple(sorted(conn.rooms)),
                      emptied=tuple(emptied))

    # -- queries -------------------------------------------------------------
    def subscribers(self, channel: str) -> AbstractSet[str]:
        """Conn ids that a publication on `channel` reaches (empty if none)."""
        return self._channels.get(channel, _EMPTY)

    def in_use(self, channel: str) -> bool:
        """True while some local connection needs `channel` (all/node always)."""
        return channel in self._channels

    def channels(self) -> list[str]:
        return list(self._channels)

    def user_of(self, conn_id: str) -> str | None:
        return self._conns[conn_id].user_id

    def rooms_of(self, conn_id: str) -> frozenset[str]:
        conn = self._conns.get(conn_id)
        return frozenset(conn.rooms) if conn else _EMPTY

    def room_members(self, room: str) -> AbstractSet[str]:
        return self._rooms.get(room, _EMPTY)

    def rooms(self) -> dict[str, int]:
        return {room: len(conns) for room, conns in self._rooms.items()}

    def room_count(self) -> int:
        return len(self._rooms)

    def connections(self) -> Iterator[tuple[str, str | None, frozenset[str]]]:
        """(conn_id, user_id, rooms) for every connection: for re-registration."""
        for conn_id, conn in self._conns.items():
            yield conn_id, conn.user_id, frozenset(conn.rooms)

    def user_count(self, user_id: str) -> int:
        """How many of this node's connections (admitted ones included) belong to `user_id`."""
        return len(self._users.get(user_id, _EMPTY))

    def users(self) -> dict[str, int]:
        return {user: len(conns) for user, conns in self._users.items()}

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._conns

    # -- internals -----------------------------------------------------------
    def _attach(self, channel: str, conn_id: str) -> tuple[str, ...]:
        conns = self._channels.get(channel)
        if conns is None:
            self._channels[channel] = {conn_id}
            return (channel,)
        conns.add(conn_id)
        return ()

    def _detach(self, channel: str, conn_id: str) -> tuple[str, ...]:
        return (channel,) if _discard(self._channels, channel, conn_id) else ()


def _discard(index: dict[str, set[str]], key: str, conn_id: str) -> bool:
    """Remove conn_id from index[key]; drop the key and return True when it empties."""
    conns = index.get(key)
    if conns is None:
        return False
    conns.discard(conn_id)
    if conns:
        return False
    del index[key]
    return True
