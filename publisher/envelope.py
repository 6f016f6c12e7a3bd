"""The msgpack envelope every node and publisher puts on a Redis channel.

`{"v": 1, "id": str, "origin": str, "msg": {...}, "exclude"?: conn_id, "ts"?: float,
  "offset"?: int, "epoch"?: str}`

`offset` and `epoch` are the message's position in its room's or user's
stream (docs/protocol.md). Only the publish script adds them
(`publisher.history`), so `pack` never writes them; `unpack` reads them and
ignores a malformed pair rather than dropping the message.

`ts` (publish time, Unix seconds as a float) is an optional field this
implementation adds so nodes can measure publish-to-deliver latency; other
publishers may leave it out.

`id` is what makes a retry safe: a node delivers an id once and drops a
repeat seen within its window (docs/protocol.md), so a publisher that
timed out may send the same bytes again. Ids are a random per-process prefix
and a counter; the prefix is drawn anew in a forked child (Celery's prefork
workers import the publisher before they fork), so no two processes share one.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from publisher.message import Message, MessageError

__all__ = ["MAX_ENVELOPE_BYTES", "VERSION", "Envelope", "EnvelopeError", "new_message_id", "pack",
           "position_of", "process_token", "unpack"]

VERSION = 1
MAX_ENVELOPE_BYTES = 1024 * 1024
"""The largest payload a node takes from Redis by default (`--max-envelope-bytes`);
publishers refuse to send a larger one, so a worker cannot stall every node."""

_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)


def _reseed() -> None:
    """After fork: a child must not reuse its parent's id prefix."""
    global _PREFIX, _COUNTER
    _PREFIX = os.urandom(6).hex()
    _COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def process_token() -> str:
    """A random token unique to this process (drawn again after fork)."""
    return _PREFIX


class EnvelopeError(ValueError):
    """A payload from Redis that is not a valid envelope: count it and drop it."""


def new_message_id() -> str:
    """A message id unique across processes: a random process prefix and a counter."""
    return f"{_PREFIX}-{next(_COUNTER)}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One publication: a Message with routing and origin information."""

    msg: Message
    origin: str
    id: str = ""
    exclude: str | None = None
    ts: float | None = None
    offset: int | None = None
    epoch: str | None = None
    control: dict[str, Any] | None = None
    """The `ctl` map of a server-side control command (publisher.control); `msg` is then a placeholder."""


_CONTROL = Message("control")


def pack(env: Envelope) -> bytes:
    """Encode for PUBLISH; fills in `id` and `ts` when absent."""
    out: dict[str, Any] = {
        "v": VERSION,
        "id": env.id or new_message_id(),
        "origin": env.origin,
        "msg": env.msg.to_wire(),
        "ts": env.ts if env.ts is not None else time.time(),
    }
    if env.exclude is not None:
        out["exclude"] = env.exclude
    return msgpack.packb(out, use_bin_type=True)  # type: ignore[no-any-return]


def position_of(payload: bytes) -> tuple[int, str] | None:
    """(offset, epoch) of a payload that `unpack` refuses, when it has them.

    A stored message the node cannot deliver still holds its place in the
    stream's offsets; the node must know it, or the next one looks like a gap.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(raw, dict):
        return None
    offset, epoch = raw.get("offset"), raw.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 1 or not isinstance(epoch, str) or not epoch:
        return None
    return offset, epoch


def unpack(payload: bytes) -> Envelope:
    """Decode a payload from Redis, raising EnvelopeError on anything malformed."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError(f"payload is not msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise EnvelopeError("envelope is not a map")
    if raw.get("v") != VERSION:
        raise EnvelopeError(f"unknown envelope version {raw.get('v')!r}")
    control = raw.get("ctl")
    if control is not None:  # a command for the node, not a message (publisher.control)
        origin, mid = raw.get("origin"), raw.get("id")
        if not isinstance(control, dict) or not isinstance(origin, str) or not isinstance(mid, str):
            raise EnvelopeError("a control envelope needs a 'ctl' map and string 'origin' and 'id'")
        return Envelope(msg=_CONTROL, origin=origin, id=mid, control=control)
    try:
        msg = Message.from_wire(raw.get("msg"))
    except MessageError as exc:
        raise EnvelopeError(f"bad msg: {exc}") from None
    origin, mid, exclude, ts = raw.get("origin"), raw.get("id"), raw.get("exclude"), raw.get("ts")
    if not isinstance(origin, str) or not isinstance(mid, str):
        raise EnvelopeError("'origin' and 'id' must be strings")
    if exclude is not None and not isinstance(exclude, str):
        raise EnvelopeError("'exclude' must be a string")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
        ts = None
    offset, epoch = raw.get("offset"), raw.get("epoch")
    if (isinstance(offset, bool) or not isinstance(offset, int) or offset < 1
            or not isinstance(epoch, str) or not 0 < len(epoch) <= 64):
        offset = epoch = None
    return Envelope(msg=msg, origin=origin, id=mid, exclude=exclude, ts=ts, offset=offset, epoch=epoch)
