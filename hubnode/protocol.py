"""Client frames: parsing, validation and encoding (docs/protocol.md).

Pure: no I/O. `parse_frame` (JSON text) and `parse_packed` (msgpack binary)
turn one WebSocket frame into a typed frame or a `ProtocolError` value; the
encoders produce a `hubnode.frames.Frame`, so the node builds a message once
and every target socket gets the same bytes of its wire form (server frames
are unmasked, and compressed without context, hence identical for every
connection of one form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson

from hubnode.errors import ErrorCode
from hubnode.frames import Frame, text_frame
from hubnode.wire import ClientType, ServerType
from publisher.history import client_view
from publisher.message import Message
from publisher.names import check_name

__all__ = [
    "unavailable_message",
    "Broadcast", "ClientFrame", "JoinRoom", "LeaveRoom", "Ping", "PresenceQuery", "PrivateMessage",
    "ProtocolError", "RoomMessage", "Since", "encodable", "encode_ack", "encode_error", "encode_message",
    "encode_positioned", "encode_presence", "parse_frame", "parse_packed", "since_of", "since_param", "text_frame",
]

FrameId = int | str | None


@dataclass(frozen=True, slots=True)
class Since:
    """Where a client says it was in a stream (docs/protocol.md)."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class JoinRoom:
    room: str
    id: FrameId = None
    since: Since | None = None


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    room: str
    id: FrameId = None


@dataclass(frozen=True, slots=True)
class Broadcast:
    data: Any
    id: FrameId = None


@dataclass(frozen=True, slots=True)
class RoomMessage:
    room: str
    message: Any
    id: FrameId = None


@dataclass(frozen=True, slots=True)
class PrivateMessage:
    user_id: str
    message: Any
    id: FrameId = None


@dataclass(frozen=True, slots=True)
class Ping:
    data: Any
    id: FrameId = None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """`{"type": "presence", "data": R}`: who is in room R (docs/protocol.md)."""

    room: str
    id: FrameId = None


ClientFrame = JoinRoom | LeaveRoom | Broadcast | RoomMessage | PrivateMessage | Ping | PresenceQuery


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A frame the server rejects: sent back as an `error` frame."""

    code: ErrorCode
    message: str
    id: FrameId = None


def parse_frame(text: str | bytes) -> ClientFrame | ProtocolError:
    """Parse one client text frame; never raises."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON")
    if not isinstance(raw, dict):
        return ProtocolError(ErrorCode.BAD_JSON, "frame must be a JSON object")
    return _parse_object(raw)


def parse_packed(data: bytes) -> ClientFrame | ProtocolError:
    """Parse one binary frame of the `hubnode.msgpack` subprotocol (docs/protocol.md); never raises.

    The same map as the JSON protocol; values JSON cannot carry (bytes,
    non-string keys) are refused, because the message travels on as JSON.
    """
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several types for malformed or truncated input
        return ProtocolError(ErrorCode.BAD_JSON, "frame is not valid msgpack")
    if not isinstance(raw, dict):
        return ProtocolError(ErrorCode.BAD_JSON, "frame must be a msgpack map")
    if not encodable(raw):
        fid = raw.get("id")
        return ProtocolError(ErrorCode.BAD_MESSAGE, "frame holds values JSON cannot carry "
                             "(bytes, non-string keys, or nesting too deep)",
                             fid if isinstance(fid, int | str) and not isinstance(fid, bool) else None)
    return _parse_object(raw, encodable_checked=True)


def _parse_object(raw: dict[Any, Any], encodable_checked: bool = False) -> ClientFrame | ProtocolError:
    fid = raw.get("id")
    if fid is not None and (isinstance(fid, bool) or not isinstance(fid, int | str)):
        return ProtocolError(ErrorCode.BAD_MESSAGE, "'id' must be an integer or a string")
    ftype = raw.get("type")
    if not isinstance(ftype, str):
        return ProtocolError(ErrorCode.BAD_MESSAGE, "'type' is required and must be a string", fid)
    parser = _PARSERS.get(ftype)
    if parser is None:
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown type {ftype[:64]!r}", fid)
    data = raw.get("data")
    if not encodable_checked and isinstance(data, dict | list) and not encodable(data):
        return ProtocolError(ErrorCode.BAD_MESSAGE, "'data' nests too deeply", fid)
    return parser(data, fid)


def encodable(value: Any) -> bool:
    """Whether `value` can be written back as JSON (orjson reads 1024 levels, writes 254)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _room_or_error(room: Any, fid: FrameId) -> str | ProtocolError:
    problem = check_name(room)
    if problem:
        return ProtocolError(ErrorCode.BAD_ROOM, f"room name {problem}", fid)
    return str(room)


def _join(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    """A room name, or `{"room": R, "since": {"offset": O, "epoch": E}}` (since optional)."""
    since: Since | None = None
    if isinstance(data, dict):
        if data.get("since") is not None:
            found = since_of(data["since"])
            if isinstance(found, str):
                return ProtocolError(ErrorCode.BAD_MESSAGE, f"'since' {found}", fid)
            since = found
        data = data.get("room")
    room = _room_or_error(data, fid)
    return room if isinstance(room, ProtocolError) else JoinRoom(room, fid, since)


_SINCE_SHAPE = 'must be {"offset": a whole number >= 0, "epoch": a string of 1-64 characters}'


def since_of(raw: Any) -> Since | str:
    """A `since` object, or what is wrong with it."""
    if not isinstance(raw, dict):
        return _SINCE_SHAPE
    offset, epoch = raw.get("offset"), raw.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return _SINCE_SHAPE
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        return _SINCE_SHAPE
    return Since(offset, epoch)


def since_param(text: str) -> Since | str:
    """`?since=<offset>:<epoch>` of a connect URL, or what is wrong with it."""
    offset, sep, epoch = text.partition(":")
    if not sep or not offset.isascii() or not offset.isdigit() or len(offset) > 18:
        return "since must be <offset>:<epoch>, the offset a whole number >= 0"
    found = since_of({"offset": int(offset), "epoch": epoch})
    return "since must be <offset>:<epoch>, the epoch 1-64 characters" if isinstance(found, str) else found


def _leave(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    room = _room_or_error(data, fid)
    return room if isinstance(room, ProtocolError) else LeaveRoom(room, fid)


def _room_message(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    if not isinstance(data, dict) or "message" not in data or "room" not in data:
        return ProtocolError(ErrorCode.BAD_MESSAGE,
                             "room_message data must be {\"room\": R, \"message\": any}", fid)
    room = _room_or_error(data["room"], fid)
    return room if isinstance(room, ProtocolError) else RoomMessage(room, data["message"], fid)


def _private_message(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    if not isinstance(data, dict) or "message" not in data:
        return ProtocolError(ErrorCode.BAD_MESSAGE,
                             "private_message data must be {\"user_id\": U, \"message\": any}", fid)
    problem = check_name(data.get("user_id"))
    if problem:
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"user_id {problem}", fid)
    return PrivateMessage(data["user_id"], data["message"], fid)


def _broadcast(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    return Broadcast(data, fid)


def _ping(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    return Ping(data, fid)


def _presence(data: Any, fid: FrameId) -> ClientFrame | ProtocolError:
    room = _room_or_error(data, fid)
    return room if isinstance(room, ProtocolError) else PresenceQuery(room, fid)


_PARSERS: dict[str, Callable[[Any, FrameId], ClientFrame | ProtocolError]] = {
    ClientType.JOIN_ROOM: _join,
    ClientType.LEAVE_ROOM: _leave,
    ClientType.BROADCAST: _broadcast,
    ClientType.ROOM_MESSAGE: _room_message,
    ClientType.PRIVATE_MESSAGE: _private_message,
    ClientType.PING: _ping,
    ClientType.PRESENCE: _presence,
}

# -- encoding ----------------------------------------------------------------

def encode_message(msg: Message) -> Frame:
    """The frame of a message, built once and shared by all targets."""
    return Frame(orjson.dumps(msg.to_wire()))


def encode_positioned(msg: Message, offset: int, epoch: str) -> Frame:
    """The frame of a message of a stream with history: its `offset` and `epoch` at top level."""
    return Frame(orjson.dumps(client_view(msg, offset, epoch)))


def encode_presence(room: str, users: dict[str, int], anonymous: int, fid: FrameId = None) -> Frame:
    """The answer to a presence query (it is the answer: no separate ack)."""
    out: dict[str, Any] = {"type": ServerType.PRESENCE, "room": room, "data": {"users": users, "anonymous": anonymous}}
    if fid is not None:
        out["id"] = fid
    return Frame(orjson.dumps(out))


def unavailable_message(maybe_published: bool) -> str:
    """The text of an `unavailable` error: true to what is known of the publish.

    After a timeout or a broken connection the PUBLISH may have reached
    Redis; saying "nothing was published" then would make a client's retry a
    silent duplicate.
    """
    if maybe_published:
        return "broker did not answer in time: the message may have been published"
    return "broker unreachable: nothing was published"


def encode_ack(fid: int | str, data: Any = None) -> Frame:
    """An ack; a join of a room with history carries the stream's position in `data`."""
    if data is None:
        return Frame(orjson.dumps({"type": ServerType.ACK, "id": fid}))
    return Frame(orjson.dumps({"type": ServerType.ACK, "id": fid, "data": data}))


def encode_error(code: ErrorCode, message: str, fid: FrameId = None, room: str | None = None) -> Frame:
    """An error frame; `room` names the room of a refused server-side join (it answers no client frame)."""
    data: dict[str, Any] = {"code": code.value, "message": message}
    if room is not None:
        data["room"] = room
    out: dict[str, Any] = {"type": ServerType.ERROR, "data": data}
    if fid is not None:
        out["id"] = fid
    return Frame(orjson.dumps(out))
