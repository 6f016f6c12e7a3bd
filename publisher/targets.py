"""Where a message goes: all, a room or a user, and the channel that reaches it.

Pure functions shared by the node's HTTP API, the Hub API and both publishers,
so every path validates and routes a message the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from publisher import envelope as _envelope
from publisher.envelope import MAX_ENVELOPE_BYTES, Envelope, pack
from publisher.keys import Keys
from publisher.message import Message, MessageError, check_publishable
from publisher.names import check_name

__all__ = ["Packed", "Target", "coerce_message", "envelope_for", "pack_for", "posted_message", "target_of"]

Kind = Literal["all", "room", "user"]


@dataclass(frozen=True, slots=True)
class Target:
    """A publish target; `name` is the room or user id ('' for all)."""

    kind: Kind
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("all", "room", "user"):
            raise MessageError(f"unknown target kind {self.kind!r}")
        if self.kind != "all":
            problem = check_name(self.name)
            if problem:
                label = "room name" if self.kind == "room" else "user id"
                raise MessageError(f"{label} {problem}")

    def channel(self, keys: Keys) -> str:
        if self.kind == "room":
            return keys.room_channel(self.name)
        if self.kind == "user":
            return keys.user_channel(self.name)
        return keys.all


def target_of(msg: Message) -> Target:
    """docs/http-api.md: `room` set -> room; else `user_id` -> user; else all."""
    if msg.room is not None:
        return Target("room", msg.room)
    if msg.user_id is not None:
        return Target("user", msg.user_id)
    return Target("all")


def posted_message(raw: Any) -> tuple[Target, Message]:
    """The target and the message of a POST /broadcast body.

    `room` -> that room; else `to` -> that user; else `user_id` -> that user,
    the 0.1 form, kept for compatibility. In that last form `user_id` names
    the recipient, so it is removed from what is delivered: a client must not
    read its own id as the sender. With `to`, `user_id` may still name a
    sender the caller vouches for. `room` and `to` together are refused
    rather than guessed.
    """
    if not isinstance(raw, dict):
        raise MessageError("a message must be a JSON object / msgpack map")
    body = dict(raw)
    to = body.pop("to", None)
    msg = Message.from_wire(body)
    if to is not None:
        problem = check_name(to)
        if problem:
            raise MessageError(f"'to' (the user to deliver to) {problem}")
        if msg.room is not None:
            raise MessageError("a message goes to a room or to a user: give either room or to, not both")
        return Target("user", to), msg
    if msg.room is None and msg.user_id is not None:
        return Target("user", msg.user_id), replace(msg, user_id=None)
    return target_of(msg), msg


def coerce_message(msg: Message | Mapping[str, Any]) -> Message:
    """Accept a Message or a dict with the seed's fields; stamp the time.

    Raises MessageError (a ValueError) before anything is sent.
    """
    if isinstance(msg, Message):
        checked = Message.from_wire(msg.to_wire())
    elif isinstance(msg, Mapping):
        checked = Message.from_wire(dict(msg))
    else:
        raise MessageError(f"expected a Message or a dict, got {type(msg).__name__}")
    return checked.stamped()


class Packed(NamedTuple):
    """One packed publish: the channel, the envelope bytes and the envelope id (the history script's retry key)."""

    channel: str
    payload: bytes
    id: str


def pack_for(target: Target, msg: Message, origin: str, keys: Keys, exclude: str | None = None) -> Packed:
    """The single place publishes are packed.

    A message to a room carries the room's name, as the seed's BroadcastToRoom did.
    Raises MessageError for a type reserved for the node (`check_publishable`)
    and for a payload over `MAX_ENVELOPE_BYTES`.
    """
    check_publishable(msg)
    if target.kind == "room" and msg.room is None:
        msg = replace(msg, room=target.name)
    mid = _envelope.new_message_id()  # looked up at call time: tests may fix it
    payload = pack(Envelope(msg=msg, origin=origin, id=mid, exclude=exclude))
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise MessageError(f"message packs to {len(payload)} bytes, over the limit of {MAX_ENVELOPE_BYTES} "
                           "that nodes accept from Redis")
    return Packed(target.channel(keys), payload, mid)


def envelope_for(target: Target, msg: Message, origin: str, keys: Keys,
                 exclude: str | None = None) -> tuple[str, bytes]:
    """(channel, payload) for one publish: `pack_for` without the id."""
    packed = pack_for(target, msg, origin, keys, exclude)
    return packed.channel, packed.payload
