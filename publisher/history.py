"""Stream history (docs/protocol.md): which streams keep it, how a publish appends, how it is read.

A room and a user each have a *stream*. With history, a publish appends the
envelope to a Redis STREAM, gives it the next offset and publishes it, in one
Lua script (`lua/publish.lua`) whose keys share the channel's hash tag, so
the step is atomic and stays inside one Redis Cluster slot. The node, the
HTTP API, the Hub API, `Publisher`, `AsyncPublisher` and hubctl all publish
to rooms and users through that script, whatever their own settings: a
stream that has history is appended to by everyone, so its offsets never skip.

Pure apart from reading the two Lua files: no redis, no asyncio.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, NamedTuple

import msgpack

from publisher.envelope import Envelope, EnvelopeError, position_of, unpack
from publisher.keys import Keys
from publisher.message import RESERVED_TYPES, Message
from publisher.names import check_name, matches_any
from publisher.query import Query, ScriptCall
from publisher.targets import Target

__all__ = [
    "DEFAULT_TTL", "MAX_SIZE", "PUBLISH_SCRIPT", "READ_SCRIPT", "History", "HistoryPage", "HistoryPolicy",
    "LuaScript", "StreamRead", "StreamRef", "client_view", "history_query", "load_script", "new_epoch",
    "parse_patterns", "publish_call", "read_call", "splice", "stored", "stream_of",
]

DEFAULT_TTL = 300
MAX_SIZE = 10_000
"""The most messages a stream keeps: a join replays its whole window in one step, so the window
bounds what one client frame can make Redis and a node do (the nodes' --history-size has the same bound)."""
MAX_EPOCH_CHARS = 64


class LuaScript(NamedTuple):
    """A script shipped with the package: its text and the SHA1 Redis knows it by."""

    name: str
    text: str
    sha: str


def load_script(name: str) -> LuaScript:
    """A script of publisher/lua/, with its SHA1."""
    text = (resources.files("publisher") / "lua" / f"{name}.lua").read_text()
    return LuaScript(name, text, hashlib.sha1(text.encode()).hexdigest())


PUBLISH_SCRIPT = load_script("publish")
"""KEYS: stream, meta, ids. ARGV: channel, envelope, envelope id, size, ttl, fresh epoch, and "1" to publish
with SPUBLISH (a Redis Cluster: sharded pub/sub).
Answers {receivers, offset, epoch} (offset 0: the stream has no history, a plain PUBLISH)."""

READ_SCRIPT = load_script("read")
"""KEYS: stream, meta, ids. ARGV: since (-1: position only), limit (0: all), create (1/0), fresh epoch, size, ttl.
Answers {epoch or nil, top, entries kept, [envelope, ...]}."""


def new_epoch() -> str:
    """A fresh epoch: random, so a stream recreated after a loss never reuses one."""
    return os.urandom(5).hex()


# -- which streams keep history ---------------------------------------------------

def parse_patterns(text: str | Sequence[str]) -> tuple[str, ...]:
    """`--history-rooms`: comma-separated room names or `prefix*` (`*` = every room).

    Raises ValueError naming the bad pattern.
    """
    expected = "expected room names or prefix* patterns, comma-separated (default '*')"
    items = text.split(",") if isinstance(text, str) else list(text)
    patterns = tuple(p.strip() for p in items if p.strip())
    if not patterns:
        raise ValueError(expected)
    for pattern in patterns:
        stem = pattern[:-1] if pattern.endswith("*") else pattern
        if "*" in stem:
            raise ValueError(f"{expected}; in {pattern!r} a '*' is not at the end")
        problem = check_name(stem) if stem else None
        if problem:
            raise ValueError(f"{expected}; {pattern!r}: a room name {problem}")
    return patterns


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """A node's or publisher's history settings (`--history-size` and friends).

    `size` 0 turns this party's history off; it still appends to streams that
    already have history (the script decides, with the stream's own settings).
    """

    size: int = 0
    ttl: int = DEFAULT_TTL
    rooms: tuple[str, ...] = ("*",)
    users: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_SIZE:
            raise ValueError(f"history size {self.size!r}: expected a whole number from 0 to {MAX_SIZE} (0 = off)")
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or self.ttl < 1:
            raise ValueError(f"history ttl {self.ttl!r}: expected whole seconds >= 1")
        object.__setattr__(self, "rooms", parse_patterns(self.rooms))

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def covers(self, kind: str, name: str) -> bool:
        """Whether this party keeps history for the room or user stream `name`."""
        if self.size <= 0:
            return False
        if kind == "room":
            return matches_any(self.rooms, name)
        return kind == "user" and self.users

    def size_for(self, target: Target) -> int:
        """The size this party asks for when publishing to `target` (0: none of its own)."""
        return self.size if self.covers(target.kind, target.name) else 0

    @classmethod
    def resolve(cls, size: int | None = None, ttl: int | None = None, rooms: str | Sequence[str] | None = None,
                users: bool | None = None, env: Mapping[str, str] | None = None) -> HistoryPolicy:
        """The settings given, the HUB_HISTORY_* variables for the others (as `from_env`)."""
        base = cls.from_env(env)
        return cls(base.size if size is None else size, base.ttl if ttl is None else ttl,
                   base.rooms if rooms is None else parse_patterns(rooms), base.users if users is None else users)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HistoryPolicy:
        """HUB_HISTORY_SIZE, HUB_HISTORY_TTL, HUB_HISTORY_ROOMS, HUB_HISTORY_USERS, as the node reads them.

        A worker deployed beside the nodes then creates the same streams they do.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in ("size", "ttl"):
            raw = env.get(f"HUB_HISTORY_{name.upper()}")
            if raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"HUB_HISTORY_{name.upper()}={raw!r}: expected a whole number") from None
        if env.get("HUB_HISTORY_ROOMS"):
            values["rooms"] = env["HUB_HISTORY_ROOMS"]
        users = (env.get("HUB_HISTORY_USERS") or "").strip().lower()
        if users:
            if users not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"HUB_HISTORY_USERS={users!r}: expected on or off")
            values["users"] = users in ("1", "true", "yes", "on")
        return cls(**values)


# -- streams ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StreamRef:
    """A room's or user's stream: its channel and its two keys."""

    kind: str
    name: str
    channel: str
    stream: str
    meta: str
    ids: str

    @property
    def keys(self) -> tuple[str, str, str]:
        """The scripts' KEYS, in their order."""
        return (self.stream, self.meta, self.ids)


def stream_of(keys: Keys, kind: str, name: str) -> StreamRef:
    """The stream of room or user `name` ("room"/"user")."""
    channel = keys.room_channel(name) if kind == "room" else keys.user_channel(name)
    return StreamRef(kind, name, channel, keys.stream(kind, name), keys.stream_meta(kind, name),
                     keys.stream_ids(kind, name))


def publish_call(keys: Keys, target: Target, channel: str, payload: bytes, envelope_id: str,
                 policy: HistoryPolicy, sharded: bool = False) -> ScriptCall:
    """The script call that publishes to a room or user, appending to its history when it has one.

    `sharded`: the script publishes with SPUBLISH (a Redis Cluster, docs/redis.md).
    """
    ref = stream_of(keys, target.kind, target.name)
    return ScriptCall(PUBLISH_SCRIPT, ref.keys,
                      (channel, payload, envelope_id, policy.size_for(target), policy.ttl, new_epoch(),
                       "1" if sharded else ""))


def read_call(ref: StreamRef, since: int, limit: int = 0, create: HistoryPolicy | None = None) -> ScriptCall:
    """The script call that reads a stream's position and its entries above `since` (-1: none).

    With `create`, a stream without an epoch gets one (offset 0): a stream
    covered by history always has a position.
    """
    if create is None:
        extra: tuple[Any, ...] = (0, "", 0, 0)
    else:
        extra = (1, new_epoch(), create.size, create.ttl)
    return ScriptCall(READ_SCRIPT, ref.keys, (since, limit, *extra))


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What a read of a stream found: its position and the envelopes above the offset asked for."""

    epoch: str | None
    top: int
    kept: int
    payloads: tuple[bytes, ...] = ()

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> StreamRead:
        epoch, top, kept, payloads = reply
        if isinstance(epoch, bytes):
            epoch = epoch.decode()
        return cls(epoch or None, int(top), int(kept), tuple(payloads))

    def recovers(self, offset: int, epoch: str) -> bool:
        """docs/protocol.md: the same epoch, and offset + 1 still in the window (or nothing missed)."""
        return (self.epoch is not None and epoch == self.epoch
                and self.top - self.kept <= offset <= self.top)


# -- what clients see ------------------------------------------------------------------

def client_view(msg: Message, offset: int | None, epoch: str | None) -> dict[str, Any]:
    """The JSON map a client receives: the message, with its position when it has one."""
    out = msg.to_wire()
    if offset is not None:
        out["offset"] = offset
        out["epoch"] = epoch
    return out


@dataclass(frozen=True, slots=True)
class History:
    """`GET /api/rooms/<room>/history`'s answer: the position and the messages above `since`."""

    epoch: str | None
    offset: int
    messages: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "messages": self.messages}


class HistoryPage:
    """One history read, as clients received the messages, in as many stream reads as it takes.

    Stored messages no client ever received (one that does not decode, a
    node-only type, one JSON cannot carry) are left out; the page then reads
    on past them, so a client paging by the last offset it got always gets
    further. Pure: the caller does each read (`want()`, then `add()`).
    """

    MAX_READS = 8

    def __init__(self, ref: StreamRef, since: int, limit: int) -> None:
        self.ref = ref
        self.since = max(0, since)
        self.limit = limit
        self.messages: list[dict[str, Any]] = []
        self.epoch: str | None = None
        self.top = 0
        self._reads = 0
        self._done = False

    def want(self) -> int:
        """How many entries to read above `self.since` next; 0 when the page is complete."""
        if self._done or len(self.messages) >= self.limit or self._reads >= self.MAX_READS:
            return 0
        return self.limit - len(self.messages)

    def add(self, read: StreamRead) -> None:
        self._reads += 1
        if self._reads > 1 and read.epoch != self.epoch:  # the stream was recreated between two reads
            self._done = True
            return
        self.epoch, self.top = read.epoch, read.top
        for payload in read.payloads:
            view, offset = _view(payload, self.ref)
            if offset is not None:
                self.since = max(self.since, offset)
            if view is not None:
                self.messages.append(view)
        if not read.payloads or self.since >= read.top:
            self._done = True

    def result(self) -> History:
        return History(self.epoch, self.top, self.messages[:self.limit])


def stored(payload: bytes) -> tuple[int, str, Envelope | None] | None:
    """A stored entry as (offset, epoch, envelope), the envelope None when no client may get it.

    One that does not decode, or whose type is the node's own (live, the node
    drops both), keeps its place with None: offsets stay contiguous, and a
    reader skips it without taking the hole for a loss. None for an entry
    without a position (not written by the script).
    """
    try:
        env = unpack(payload)
    except EnvelopeError:
        position = position_of(payload)
        return None if position is None else (*position, None)
    if env.offset is None or env.epoch is None:
        return None
    return env.offset, env.epoch, None if env.msg.type in RESERVED_TYPES else env


def _view(payload: bytes, ref: StreamRef) -> tuple[dict[str, Any] | None, int | None]:
    """(what a client received or None, the entry's offset)."""
    entry = stored(payload)
    if entry is None:
        return None, None
    env = entry[2]
    if env is None:
        return None, entry[0]
    msg = env.msg
    if ref.kind == "room" and msg.room is None:
        msg = replace(msg, room=ref.name)
    view = client_view(msg, env.offset, env.epoch)
    try:
        json.dumps(view, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # bytes, non-string keys, NaN, nesting
        return None, env.offset
    return view, env.offset


MAX_LIMIT = 10_000


def check_limit(limit: object) -> int:
    """A history read's `limit`: 1 to 10,000 messages (ValueError otherwise)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit {limit!r}: expected a whole number from 1 to {MAX_LIMIT}")
    return limit


def target_of_query(room: str | None, user: str | None) -> tuple[str, str]:
    """("room", R) or ("user", U) for a history read; exactly one must be given (ValueError)."""
    if (room is None) == (user is None):
        raise ValueError("give a room or a user (user=...), not both")
    kind, name = ("room", room) if room is not None else ("user", user)
    problem = check_name(name)
    if problem:
        raise ValueError(f"{'room name' if kind == 'room' else 'user id'} {problem}")
    return kind, str(name)


def history_query(keys: Keys, kind: str, name: str, since: int = 0, limit: int = 100) -> Query[History]:
    """Read a room's or user's history: messages with offset above `since`, oldest first, at most `limit`."""
    page = HistoryPage(stream_of(keys, kind, name), since, limit)
    while want := page.want():
        reply = yield read_call(page.ref, page.since, want)
        page.add(StreamRead.from_reply(reply))
    return page.result()


# -- the same append, in Python, for the embedded broker ---------------------------------

def splice(payload: bytes, offset: int, epoch: str) -> bytes:
    """The envelope with `offset` and `epoch` added, byte for byte as lua/publish.lua builds it."""
    head = payload[0] if payload else 0
    if 0x80 <= head <= 0x8F:
        count, body = head - 0x80, payload[1:]
    elif head == 0xDE and len(payload) >= 3:
        count, body = (payload[1] << 8) | payload[2], payload[3:]
    else:
        raise EnvelopeError("the envelope must be a msgpack map")
    count += 2
    header = bytes((0x80 + count,)) if count <= 15 else bytes((0xDE, count >> 8, count & 0xFF))
    tail: bytes = msgpack.packb("offset") + msgpack.packb(offset) + msgpack.packb("epoch") + msgpack.packb(epoch)
    return header + body + tail
