"""What every publisher shares: defaults, validation, packing, the PUBLISH query and the control query.

`Publisher`, `AsyncPublisher` and `RecordingPublisher` are adapters over the
functions here; none of them validates or packs a message by itself, so the
three cannot disagree about what is sent. Nothing here does I/O or imports
redis or asyncio.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from publisher.control import Command, pack_command
from publisher.envelope import process_token
from publisher.history import HistoryPolicy
from publisher.history import publish_call as stream_publish_call
from publisher.keys import DEFAULT_PREFIX, Keys
from publisher.message import Message, MessageError
from publisher.names import check_name
from publisher.query import Call, Query, ScriptCall
from publisher.targets import Target, coerce_message, pack_for

__all__ = [
    "BATCH_SIZE", "DEFAULT_TIMEOUT", "DEFAULT_URL", "Item", "MessageLike", "Origin", "Outgoing",
    "control_query", "default_prefix", "default_url", "make_origin", "prepare", "prepare_many", "publish_call",
    "publish_query", "receivers", "redact_url",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_TIMEOUT = 5.0
BATCH_SIZE = 1000
"""publish_many sends at most this many PUBLISH commands per pipeline round trip,
so a huge batch does not build one huge buffer."""

MessageLike = Message | Mapping[str, Any]
Item = tuple[Target, MessageLike]


_USERINFO_PASSWORD = re.compile(r"(//[^/?#@]*?:)[^/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any password masked (`user:***@`, `?password=***`), fit for an error or a log line.

    Textual, not parsed: a URL too broken to parse is exactly the one an error
    message quotes, and it must not leak its password either.
    """
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", url))


def default_url() -> str:
    """HUB_REDIS_URL, as the node reads it (docs/configuration.md), else local Redis."""
    return os.environ.get("HUB_REDIS_URL") or DEFAULT_URL


def default_prefix() -> str:
    """HUB_KEY_PREFIX, else "hub:".

    Read from the environment like the node's `--key-prefix`, so a worker
    deployed beside nodes with a custom prefix does not publish into a
    namespace nobody listens to.
    """
    return os.environ.get("HUB_KEY_PREFIX") or DEFAULT_PREFIX


def make_origin(origin_id: str | None = None) -> str:
    """The envelope `origin` of a publisher: "pub:<id>", a random id by default.

    Raises ValueError for an id that breaks the name rules (it appears in logs
    and may one day appear in a channel name).
    """
    oid = os.urandom(6).hex() if origin_id is None else origin_id
    problem = check_name(oid)
    if problem:
        raise ValueError(f"origin id {problem}")
    return f"pub:{oid}"


_SERIAL = itertools.count(1)


class Origin:
    """A publisher's envelope `origin`: the id it was given, else a per-process one.

    A default origin is derived from the process token at each use, so a
    Publisher built before a fork (a Celery module-level publisher) names each
    child differently instead of every child sharing the parent's name.
    """

    __slots__ = ("_fixed", "_serial")

    def __init__(self, origin_id: str | None = None) -> None:
        self._fixed = make_origin(origin_id) if origin_id is not None else None
        self._serial = next(_SERIAL)

    def __str__(self) -> str:
        return self._fixed or f"pub:{process_token()}-{self._serial}"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One validated publish: what is sent, and what it means."""

    target: Target
    message: Message
    channel: str
    payload: bytes
    id: str = ""


def prepare(target: Target, msg: MessageLike, origin: str, keys: Keys) -> Outgoing:
    """Validate `msg` with the node's rules, stamp its time and pack the envelope.

    Raises MessageError (a ValueError) with a sentence a human can act on;
    nothing has been sent at that point.
    """
    if not isinstance(target, Target):
        raise MessageError(f"expected a Target, got {type(target).__name__}")
    message = coerce_message(msg)
    try:
        packed = pack_for(target, message, origin, keys)
    except MessageError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack's ways of refusing a value
        raise MessageError(f"message cannot be encoded with msgpack: {exc}") from None
    return Outgoing(target, message, packed.channel, packed.payload, packed.id)


def prepare_many(items: Iterable[Item], origin: str, keys: Keys) -> list[Outgoing]:
    """Prepare a whole batch first, so one bad item means nothing of it is sent."""
    batch: list[Outgoing] = []
    for index, item in enumerate(items):
        if not isinstance(item, tuple) or len(item) != 2:
            raise MessageError(f"item {index}: expected a (Target, message) pair")
        try:
            batch.append(prepare(item[0], item[1], origin, keys))
        except MessageError as exc:
            raise MessageError(f"item {index}: {exc}") from None
    return batch


def publish_call(out: Outgoing, keys: Keys, history: HistoryPolicy, sharded: bool = False) -> Call | ScriptCall:
    """A plain PUBLISH for `all`; for a room or a user the history script (it appends when the stream has history).

    `sharded` (a Redis Cluster): SPUBLISH, in the script too, so the message
    travels only inside the shard that owns the channel's slot.
    """
    if out.target.kind == "all":
        return Call("spublish" if sharded else "publish", (out.channel, out.payload))
    return stream_publish_call(keys, out.target, out.channel, out.payload, out.id, history, sharded)


def receivers(reply: Any) -> int:
    """The node count of a PUBLISH reply or of the history script's {receivers, offset, epoch}."""
    return int(reply[0]) if isinstance(reply, list | tuple) else int(reply)


def publish_query(batch: Sequence[Outgoing], keys: Keys, history: HistoryPolicy,
                  batch_size: int = BATCH_SIZE, sharded: bool = False) -> Query[list[int]]:
    """Publish every item in order; answers the node count of each.

    One item is one command; more go in pipelines of `batch_size`.
    Pipelines keep the order because one connection sends them in sequence.
    """
    if len(batch) == 1:
        reply = yield publish_call(batch[0], keys, history, sharded)
        return [receivers(reply)]
    counts: list[int] = []
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size]
        replies = yield [publish_call(o, keys, history, sharded) for o in part]
        counts.extend(receivers(r) for r in replies)
    return counts


def control_query(command: Command, origin: str, keys: Keys, sharded: bool = False) -> Query[int]:
    """Send one control command (docs/protocol.md); answers how many nodes took it.

    A plain PUBLISH (SPUBLISH when `sharded`) on `command.channel(keys)`,
    never the history script: a command is not a message and is never
    stored. The payload is packed once, when the query starts, so a driver
    that resends the step after a lost connection resends the same envelope
    id, which a node acts on once. `command` was validated when it was built.
    """
    _, payload = pack_command(command, origin)
    reply = yield Call("spublish" if sharded else "publish", (command.channel(keys), payload))
    return int(reply)
