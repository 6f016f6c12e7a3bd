"""The `Message` of the wire contract (docs/protocol.md).

This module is the single definition of what a hub message looks like; the
node, the publishers and the tests all build and read messages through it, so
the JSON a browser sees and the msgpack map a worker publishes cannot drift
apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from publisher.names import check_name

__all__ = ["EVENT_TYPES", "RESERVED_TYPES", "Message", "MessageError", "check_publishable"]

_OPTIONAL = ("room", "user_id", "metadata", "id")

RESERVED_TYPES = frozenset({"ack", "error", "pong", "connected"})
"""Types only a node sends, as answers to a client's own frames (docs/protocol.md).

A published message of one of these types could settle a client's pending
request with a forged answer, so every publish path refuses them
(`check_publishable`) and every node drops them when they arrive from Redis.
"""

EVENT_TYPES = frozenset({"presence"})
"""Types only hubnode's own membership steps publish (docs/protocol.md).

A presence event comes from the Lua step that changed the membership, through
Redis, so nodes deliver it; every publish path refuses the type, so no
worker or HTTP caller can announce a join or a leave that did not happen.
"""


class MessageError(ValueError):
    """A message (or a dict meant to become one) breaks the contract."""


@dataclass(frozen=True, slots=True)
class Message:
    """One hub message: exactly the seed's fields plus `id` for acks.

    `timestamp` is Unix seconds; 0 means "not set yet" and is filled with the
    current time by whoever sends the message (node or publisher).
    """

    type: str
    data: Any = None
    room: str | None = None
    user_id: str | None = None
    timestamp: int = 0
    metadata: dict[str, Any] | None = None
    id: int | str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON/msgpack map: absent optional fields are omitted, not null."""
        out: dict[str, Any] = {
            "type": self.type,
            "data": self.data,
            "timestamp": self.timestamp or int(time.time()),
        }
        if self.room is not None:
            out["room"] = self.room
        if self.user_id is not None:
            out["user_id"] = self.user_id
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.id is not None:
            out["id"] = self.id
        return out

    def stamped(self) -> Message:
        """This message with `timestamp` set to now when it was unset."""
        if self.timestamp:
            return self
        return Message(self.type, self.data, self.room, self.user_id,
                       int(time.time()), self.metadata, self.id)

    @classmethod
    def from_wire(cls, raw: Any) -> Message:
        """Build and validate a Message from a decoded JSON or msgpack map.

        Raises MessageError with a sentence a human can act on; nulls stand
        for absent fields so that publishers in other languages may send them.
        """
        if not isinstance(raw, dict):
            raise MessageError("a message must be a JSON object / msgpack map")
        mtype = raw.get("type")
        if not isinstance(mtype, str) or not mtype:
            raise MessageError("'type' is required and must be a non-empty string")
        ts = raw.get("timestamp") or 0
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise MessageError("'timestamp' must be a number of Unix seconds")
        metadata = raw.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise MessageError("'metadata' must be an object")
        mid = raw.get("id")
        if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int | str)):
            raise MessageError("'id' must be an integer or a string")
        room = _optional_name(raw, "room")
        user_id = _optional_name(raw, "user_id")
        return cls(mtype, raw.get("data"), room, user_id, int(ts), metadata, mid)


def check_publishable(msg: Message) -> Message:
    """Return `msg` if it may be published; MessageError for a node-only type.

    The one rule every publish path applies (the node's own publishes, the
    HTTP API, the Hub API, `Publisher`, hubctl): it is called where an
    envelope is packed, so no path can skip it.
    """
    if msg.type in RESERVED_TYPES:
        raise MessageError(f"type {msg.type!r} is reserved for the node's answers and cannot be published")
    if msg.type in EVENT_TYPES:
        raise MessageError(f"type {msg.type!r} is reserved for the hub's own presence events and cannot be published")
    return msg


def _optional_name(raw: dict[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    problem = check_name(value)
    if problem:
        raise MessageError(f"'{field}' {problem}")
    return str(value)
