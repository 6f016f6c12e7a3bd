"""A node's membership changes as single-slot steps in three phases (pure: no I/O).

Each change (connect, disconnect, join, leave) is a *plan*: a generator that
yields the steps of phase 1, 2 and 3 in turn (a list each, maybe empty),
receives each phase's replies and returns the change's result (-1: the node
is not registered). Every step touches keys of one Redis Cluster hash slot:

1. node-slot steps that check the node is registered and ADD to its indexes
   (`hub:node:{<id>}:conns`, `…:rooms`, `…:users`);
2. room- and user-slot steps (`hub:members:{<room>}` with its presence
   hash `hub:presence:{<room>}`, written only by member_add.lua,
   member_remove.lua and purge_members.lua, which announce presence in the
   same step; `hub:online:{<user>}`);
3. node-slot steps that REMOVE from its indexes.

So the indexes that sweeps and listings read are always supersets of what
the room and user hashes hold. The writer of `RedisMembershipStore` drives the
plans of a batch in lock step, one pipelined round per phase; `groups` says
which changes may share rounds without landing out of order.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from redis.crc import key_slot

from publisher.keys import Keys

__all__ = ["REFUSED", "Change", "Changes", "EventArgs", "Plan", "Step", "groups", "no_events", "one_slot"]

T = TypeVar("T")

REFUSED = -2  # user_connect.lua: the user is at --max-connections-per-user


class Step(NamedTuple):
    """One single-slot call: a script of lua/ by name, or a Redis command (upper case) sent as is."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Any, ...] = ()


def one_slot(keys: Sequence[str]) -> bool:
    """True when `keys` all hash to one Redis Cluster slot (what every script call must pass)."""
    return len({key_slot(key.encode()) for key in keys}) <= 1


Plan = Generator[list[Step], list[Any], Any]

Footprint = frozenset[tuple[str, str]]  # ("conn" | "room", name)


@dataclass(frozen=True, slots=True)
class Change:
    """A plan, with what its phase 1 reads or adds and what its phase 3 may remove from the node's keys."""

    name: str
    plan: Plan
    adds: Footprint = frozenset()
    drops: Footprint = frozenset()


def groups(items: Sequence[T], change_of: Callable[[T], Change]) -> list[list[T]]:
    """Split changes, in order, into groups that may share their three rounds.

    Within a group every phase-1 step runs before every phase-3 step, so a
    change whose phase 1 reads or adds what an earlier change of the group
    may remove in phase 3 (a join of a connection whose disconnect is queued
    before it, a join of a room the node's last member just left) starts a
    new group: each change then lands as if sent alone, in order.
    """
    found: list[list[T]] = []
    dropped: set[tuple[str, str]] = set()
    for item in items:
        change = change_of(item)
        if not found or change.adds & dropped:
            found.append([])
            dropped = set()
        found[-1].append(item)
        dropped |= change.drops
    return found


EventArgs = Callable[[str], tuple[Any, ...]]
"""room -> the seven event arguments every script that writes a room's members takes first (common.lua)."""


def no_events(room: str) -> tuple[Any, ...]:
    """Event arguments that announce nothing (a store without --presence-rooms, and tests)."""
    return ("0", "", "0", "", "", 0, room)


class Changes:
    """The plans of one node's changes, with its keys."""

    def __init__(self, keys: Keys, node: str, events: EventArgs = no_events) -> None:
        self.keys = keys
        self.node = node
        self.events = events

    def add_members(self, room: str, pairs: Sequence[str]) -> Step:
        """member_add.lua: conn, user pairs into the room (with presence counts and join events)."""
        k = self.keys
        return Step("member_add", (k.members(room), k.presence(room)), (*self.events(room), *pairs))

    def remove_members(self, room: str, conns: Sequence[str]) -> Step:
        """member_remove.lua: connections out of the room (with presence counts and leave events)."""
        k = self.keys
        return Step("member_remove", (k.members(room), k.presence(room)), (*self.events(room), *conns))

    def purge_members(self, room: str, node: str, cursor: str, count: int) -> Step:
        """purge_members.lua: one bounded step of deleting `node`'s members from the room."""
        k = self.keys
        return Step("purge_members", (k.members(room), k.presence(room)),
                    (*self.events(room), node, cursor, count))

    def connect(self, conn: str, user: str, limit: int) -> Change:
        """Count a connection ('' = anonymous); with `limit`, refuse it (REFUSED) at the user's limit."""
        footprint = frozenset({("conn", conn)})  # the refusal's undo removes it again
        return Change("connect", self._connect(conn, user, limit), adds=footprint, drops=footprint)

    def disconnect(self, conn: str, user: str, rooms: Sequence[str], emptied: Sequence[str]) -> Change:
        """Forget a connection and its memberships; `emptied`: rooms where the node has no member left."""
        drops = frozenset({("conn", conn), *(("room", room) for room in emptied)})
        return Change("disconnect", self._disconnect(conn, user, rooms, emptied), drops=drops)

    def join(self, room: str, conn: str, user: str) -> Change:
        return Change("join", self._join(room, conn, user), adds=frozenset({("conn", conn), ("room", room)}))

    def leave(self, room: str, conn: str, emptied: bool) -> Change:
        return Change("leave", self._leave(room, conn, emptied), drops=frozenset({("room", room)} if emptied else ()))

    def node_disconnect(self, conn: str, user: str, emptied: Sequence[str]) -> Step:
        k, node = self.keys, self.node
        return Step("node_disconnect", (k.node(node), k.node_conns(node), k.node_users(node), k.node_rooms(node)),
                    (conn, user, *emptied))

    # -- the plans ------------------------------------------------------------------
    def _connect(self, conn: str, user: str, limit: int) -> Plan:
        k, node = self.keys, self.node
        (counted,) = yield [Step("node_connect", (k.node(node), k.node_conns(node), k.node_users(node)), (conn, user))]
        if counted == -1 or not user:  # -1: not registered; 1 or 2: counted (now or before)
            return counted
        (allowed,) = yield [Step("user_connect", (k.online(user),), (conn, node, limit))]
        if allowed != REFUSED:
            return 1
        if counted == 1:  # counted by this call: undo it
            yield [self.node_disconnect(conn, user, ())]
        return REFUSED

    def _disconnect(self, conn: str, user: str, rooms: Sequence[str], emptied: Sequence[str]) -> Plan:
        k = self.keys
        yield []
        yield [self.remove_members(room, (conn,)) for room in rooms] + (
            [Step("HDEL", (k.online(user),), (conn,))] if user else [])
        (done,) = yield [self.node_disconnect(conn, user, emptied)]
        return done

    def _join(self, room: str, conn: str, user: str) -> Plan:
        k, node = self.keys, self.node
        (indexed,) = yield [Step("node_join", (k.node(node), k.node_conns(node), k.node_rooms(node)), (conn, room))]
        if indexed != 1:  # -1: not registered; 0: the connection is gone, so no member
            return -1 if indexed == -1 else 1
        yield [self.add_members(room, (conn, user))]
        return 1

    def _leave(self, room: str, conn: str, emptied: bool) -> Plan:
        k, node = self.keys, self.node
        yield []
        yield [self.remove_members(room, (conn,))]
        if not emptied:
            return 1
        (done,) = yield [Step("node_leave", (k.node(node), k.node_rooms(node)), (room,))]
        return done
