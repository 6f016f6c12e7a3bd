"""Read-only questions about a running hub, answered from Redis keys alone.

The layout read here is docs/redis.md's key table; every answer is the one
the nodes' HTTP API gives (docs/http-api.md), so
`hubctl stats` and `GET /api/stats` agree. Each call reads one key, so the
queries run on a Redis Cluster as on one Redis. Each question is a query
(see `publisher.query`): written once, run by `Publisher` and
`AsyncPublisher` alike. The parsing helpers are plain
functions over plain values, testable without Redis.

Clock: a node is live while its `hub:nodes` score (expiry, ms) is later than
*this* machine's clock, so inspect from a host whose clock the nodes share
(NTP), as the nodes themselves must for sweeping.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from publisher.history import load_script
from publisher.keys import Keys
from publisher.message import MessageError
from publisher.names import check_name
from publisher.query import Call, Query, ScriptCall, text

__all__ = [
    "HubStats", "Member", "NodeInfo", "Presence", "client_count", "live_nodes", "member_of", "node_info",
    "node_of", "now_ms", "presence", "presence_of", "room_count", "room_members", "rooms", "stats", "to_int",
    "user_online",
]

SCAN_COUNT = 1000
"""HSCAN hint: big enough for few round trips, small enough not to stall Redis."""


class Member(NamedTuple):
    """One connection in a room; `user_id` is None for an anonymous connection."""

    conn_id: str
    user_id: str | None
    node: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node as its Redis entries describe it.

    `heartbeat_age` (seconds since its last heartbeat) is None for a node that
    does not write the optional `heartbeat_at` field; `expires_in` (seconds
    until it counts as dead unless it heartbeats again) is known for every
    node in the Redis registry, None for a single node without one.
    """

    id: str
    clients: int
    expires_in: float | None
    heartbeat_age: float | None = None
    started_at: float | None = None
    address: str | None = None
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HubStats:
    """The numbers of `GET /api/stats`."""

    clients: int
    rooms: int
    nodes: int

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room (docs/protocol.md): users with their connection counts, and anonymous ones."""

    room: str
    users: dict[str, int]
    anonymous: int = 0

    def to_json(self) -> dict[str, Any]:
        """`GET /api/rooms/<room>/presence`'s answer."""
        return {"room": self.room, "users": self.users, "anonymous": self.anonymous}

    @property
    def connections(self) -> int:
        return sum(self.users.values()) + self.anonymous


PRESENCE_SCRIPT = load_script("presence")
"""KEYS: the room's presence hash, its members hash. Answers {HGETALL presence, HLEN members}."""


# -- pure helpers ----------------------------------------------------------

def now_ms() -> int:
    return int(time.time() * 1000)


def to_int(value: Any, default: int = 0) -> int:
    """A counter read from Redis; anything unreadable counts as `default`."""
    if value is None:
        return default
    try:
        return int(float(text(value)))
    except ValueError:
        return default


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(text(value))
    except ValueError:
        return None


def node_of(conn_id: str) -> str:
    """The node in a conn_id "<node>:<n>": everything before the last ':'."""
    return conn_id.rpartition(":")[0]


def member_of(conn_id: Any, user_id: Any) -> Member:
    """One `hub:members:{room}` field and value; "" stands for anonymous."""
    conn = text(conn_id)
    user = text(user_id) if user_id is not None else ""
    return Member(conn, user or None, node_of(conn))


def _conn_order(member: Member) -> tuple[str, int, str]:
    number = member.conn_id.rpartition(":")[2]
    return (member.node, int(number) if number.isdigit() else -1, member.conn_id)


def node_info(node_id: Any, expiry_ms: float, fields: Mapping[Any, Any], now: int) -> NodeInfo:
    """Describe one node from its ZSET score and its `hub:node:{<id>}` hash.

    Missing or unreadable fields degrade to None (0 clients) rather than fail:
    a node may be older or newer than this client.
    """
    values = {text(k): v for k, v in fields.items()}
    beat = _to_float(values.get("heartbeat_at"))
    started = _to_float(values.get("started_at"))
    if started is not None and started > 1e11:  # written in ms rather than seconds
        started /= 1000
    address, version = values.get("address"), values.get("version")
    return NodeInfo(
        id=text(node_id),
        clients=to_int(values.get("clients")),
        expires_in=round((expiry_ms - now) / 1000, 3),
        heartbeat_age=None if beat is None else round(max(0.0, now - beat) / 1000, 3),
        started_at=started,
        address=None if address is None else text(address),
        version=None if version is None else text(version),
    )


def _checked(label: str, name: str) -> str:
    problem = check_name(name)
    if problem:
        raise MessageError(f"{label} {problem}")
    return name


# -- queries -----------------------------------------------------------------

def _hscan_all(key: str) -> Query[dict[Any, Any]]:
    """Every field of a hash, read with HSCAN so a big hash never blocks Redis."""
    found: dict[Any, Any] = {}
    cursor = 0
    while True:
        cursor, page = yield Call("hscan", (key,), {"cursor": cursor, "count": SCAN_COUNT})
        found.update(page)
        if int(cursor) == 0:
            return found


def _listed_nodes(keys: Keys) -> Query[list[str]]:
    """Every node in the registry index: live, expired, or claimed by a sweep that is still going."""
    entries = yield Call("zrange", (keys.nodes, 0, -1))
    return sorted(text(node) for node in entries)


def _sscan_all(set_keys: list[str]) -> Query[set[str]]:
    """The union of these sets, read with SSCAN side by side: one round trip per page of all of them."""
    found: set[str] = set()
    cursors: dict[str, Any] = dict.fromkeys(set_keys, 0)
    while cursors:
        batch = list(cursors)
        pages = yield [Call("sscan", (key,), {"cursor": cursors[key], "count": SCAN_COUNT}) for key in batch]
        for key, (cursor, page) in zip(batch, pages, strict=True):
            found.update(text(name) for name in page)
            if int(cursor) == 0:
                del cursors[key]
            else:
                cursors[key] = cursor
    return found


def rooms(keys: Keys) -> Query[dict[str, int]]:
    """Room -> number of member connections, cluster-wide, for every room with at least one.

    The candidates are the rooms indexes of every node in the registry (each
    a superset of the rooms where that node has members, dead nodes not yet
    swept included), so the answer is exactly what the members hashes hold;
    each count is the HLEN of the room's members hash.
    """
    nodes = yield from _listed_nodes(keys)
    names = sorted((yield from _sscan_all([keys.node_rooms(node) for node in nodes])))
    counts: dict[str, int] = {}
    for start in range(0, len(names), SCAN_COUNT):
        part = names[start:start + SCAN_COUNT]
        sizes = yield [Call("hlen", (keys.members(room),)) for room in part]
        counts.update((room, n) for room, n in zip(part, map(to_int, sizes), strict=True) if n > 0)
    return counts


def room_members(keys: Keys, room: str) -> Query[list[Member]]:
    """The members of one room, ordered by node and connection number.

    Raises ValueError for an invalid room name before asking Redis.
    """
    key = keys.members(_checked("room name", room))
    raw = yield from _hscan_all(key)
    return sorted((member_of(c, u) for c, u in raw.items()), key=_conn_order)


def room_count(keys: Keys) -> Query[int]:
    """How many rooms have at least one member (the length of `rooms`)."""
    return len((yield from rooms(keys)))


def presence_of(room: str, reply: Any) -> Presence:
    """The Presence of presence.lua's answer; unreadable counts are left out, never negative."""
    flat, members = reply
    users: dict[str, int] = {}
    for field, value in zip(flat[::2], flat[1::2], strict=True):
        count = to_int(value)
        if count > 0:
            users[text(field)] = count
    return Presence(room, dict(sorted(users.items())), max(0, to_int(members) - sum(users.values())))


def presence(keys: Keys, room: str) -> Query[Presence]:
    """Who is in `room`, cluster-wide, in one atomic read (ValueError for an invalid name)."""
    _checked("room name", room)
    reply = yield ScriptCall(PRESENCE_SCRIPT, (keys.presence(room), keys.members(room)), ())
    return presence_of(room, reply)


def user_online(keys: Keys, user_id: str) -> Query[int]:
    """How many connections the user has cluster-wide (HLEN of its online hash); 0 when offline."""
    return to_int((yield Call("hlen", (keys.online(_checked("user id", user_id)),))))


def live_nodes(keys: Keys, now: int | None = None) -> Query[list[NodeInfo]]:
    """Nodes whose heartbeat has not expired, in id order, with their hash fields."""
    now = now_ms() if now is None else now
    entries = yield Call("zrangebyscore", (keys.nodes, f"({now}", "+inf"), {"withscores": True})
    ids = sorted((text(node), float(score)) for node, score in entries)
    if not ids:
        return []
    hashes = yield [Call("hgetall", (keys.node(node),)) for node, _ in ids]
    return [node_info(node, score, fields, now) for (node, score), fields in zip(ids, hashes, strict=True)]


def client_count(keys: Keys, now: int | None = None) -> Query[int]:
    """Connections cluster-wide: the sum of live nodes' `clients` (dead nodes do not count)."""
    nodes = yield from live_nodes(keys, now)
    return sum(n.clients for n in nodes)


def stats(keys: Keys, now: int | None = None) -> Query[HubStats]:
    """clients, rooms and nodes: the same numbers as `GET /api/stats`."""
    nodes = yield from live_nodes(keys, now)
    count = yield from room_count(keys)
    return HubStats(clients=sum(n.clients for n in nodes), rooms=count, nodes=len(nodes))
