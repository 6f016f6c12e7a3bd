"""The WebSocket endpoint: handshake checks, taking the socket over from aiohttp, dispatch.

Handshake refusals are HTTP errors before the upgrade, never a silent close
(docs/protocol.md). After the upgrade, bad input is answered with an
`error` frame and the connection stays open, until too many errors in a row.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from typing import Any

from aiohttp import web

from hubnode.appkey import NODE
from hubnode.auth import AuthError, Identity
from hubnode.broker.base import BrokerUnavailable
from hubnode.connection import Connection, OnFrame
from hubnode.errors import JOIN_ERRORS, CloseCode, ErrorCode
from hubnode.handshake import Accepted, negotiate
from hubnode.node import Node, NodeDraining, Refused, reconnect_frame
from hubnode.policy import ErrorStreak, TokenBucket, origin_allowed
from hubnode.protocol import (
    Broadcast,
    ClientFrame,
    JoinRoom,
    LeaveRoom,
    Ping,
    PresenceQuery,
    PrivateMessage,
    ProtocolError,
    RoomMessage,
    Since,
    encode_ack,
    encode_error,
    encode_message,
    encode_presence,
    parse_frame,
    parse_packed,
    since_param,
    unavailable_message,
)
from hubnode.wire import ServerType
from publisher.message import Message
from publisher.targets import Target

__all__ = ["websocket_handler"]

log = logging.getLogger(__name__)

Outcome = tuple[ErrorCode, str] | None


def _refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


async def _check_handshake(node: Node, request: web.Request) -> web.Response | Identity:
    """The refusal to send before the upgrade, or who the client is.

    The cheap checks come first; the connection limits are enforced by
    `Node.admit`, which reserves before it checks.
    """
    cfg = node.config
    if node.draining:
        return _refuse(503, "node draining")
    local_default = cfg.auth == "none" and cfg.on_loopback
    if not origin_allowed(request.headers.get("Origin"), cfg.allowed_origins, local_default):
        return _refuse(403, "origin not allowed")
    if not node.broker.connected:
        return _refuse(503, "broker unreachable")
    try:
        return await node.authenticate(request)
    except AuthError as exc:
        return _refuse(exc.status, exc.reason)


class _TakenOver(web.StreamResponse):
    """What the handler returns once the node owns the socket: aiohttp has nothing left to write."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """`GET /ws`: mount on any route of an aiohttp app whose `app[NODE]` is a Node."""
    node = request.app[NODE]
    accepted = negotiate(request.headers, node.config.compression)
    if isinstance(accepted, str):
        return _refuse(400, accepted)
    checked = await _check_handshake(node, request)
    if isinstance(checked, web.Response):
        return checked
    since: Since | None = None
    raw_since = request.query.get("since")
    if raw_since is not None and checked.user_id is not None:  # an anonymous connection has no user stream
        found = since_param(raw_since)
        if isinstance(found, str):
            return _refuse(400, found)
        since = found
    try:
        conn_id = await node.admit(checked, since)
    except Refused as exc:
        return _refuse(exc.status, exc.reason)
    except (BrokerUnavailable, NodeDraining) as exc:
        return _refuse(503, "node draining" if isinstance(exc, NodeDraining) else "broker unreachable")
    try:
        return _take_over(node, request, conn_id, checked, since, accepted)
    finally:  # the peer left during the handshake, or taking over failed: give the reservation back
        node.abandon(conn_id, checked.user_id)


def _take_over(node: Node, request: web.Request, conn_id: str, identity: Identity,
               since: Since | None, accepted: Accepted) -> web.StreamResponse:
    """Answer 101 and serve the socket with the node's own protocol from now on.

    aiohttp is told the connection is gone (its per-connection state is freed)
    without the socket being closed; the bytes a client sent right behind its
    upgrade request, if any, are handed over too.
    """
    transport, handler = request.transport, request.protocol
    if transport is None or transport.is_closing():
        return _TakenOver()
    cfg = node.config
    conn = Connection(conn_id, identity, transport,
                      max_outbound=cfg.max_outbound_bytes, bucket=TokenBucket(cfg.rate, cfg.burst),
                      streak=ErrorStreak(cfg.max_errors), flusher=node.flusher,
                      on_frame=_handlers(node), on_lost=node.lost, form=accepted.form,
                      max_message=cfg.max_message_bytes, min_compress=cfg.compress_min_bytes)
    tail = getattr(handler, "_message_tail", b"")
    conn.send_raw(accepted.response)  # leaves with `connected` in one write
    handler.transport = None  # so aiohttp's cleanup below cannot close the socket it no longer serves
    handler.connection_lost(None)
    transport.set_protocol(conn)
    if not transport.is_reading():
        transport.resume_reading()
    try:
        node.attach(conn, since)
    except NodeDraining:
        conn.send(reconnect_frame())
        conn.close_soon(CloseCode.GOING_AWAY, "node shutting down")
        return _TakenOver()
    conn.expiry = _expire_at(conn)
    if tail:
        conn.data_received(bytes(tail))
    return _TakenOver()


_bound: weakref.WeakKeyDictionary[Node, OnFrame] = weakref.WeakKeyDictionary()


def _handlers(node: Node) -> OnFrame:
    """One frame handler per node, shared by its connections (not one closure per socket)."""
    found = _bound.get(node)
    if found is None:
        found = _bound[node] = functools.partial(_on_frame, node)
    return found


def _expire_at(conn: Connection) -> asyncio.TimerHandle | None:
    """Close with 1008 when the token expires (one timer, no task, per connection)."""
    expires_at = conn.identity.expires_at
    if expires_at is None:
        return None
    delay = max(0.0, expires_at - time.time())
    return asyncio.get_running_loop().call_later(delay, conn.close_soon, CloseCode.POLICY, "token expired")


async def _on_frame(node: Node, conn: Connection, payload: str | bytes) -> None:
    """One text (JSON) or binary (msgpack) frame, in the connection's order."""
    if conn.closing:
        return
    frame = parse_frame(payload) if isinstance(payload, str) else parse_packed(payload)
    await _handle(node, conn, frame, time.monotonic())


async def _handle(node: Node, conn: Connection, frame: ClientFrame | ProtocolError, now: float) -> None:
    if not conn.bucket.take(now):
        node.counters.errors[ErrorCode.RATE_LIMITED] += 1
        _fail(conn, ErrorCode.RATE_LIMITED, "over the rate limit: frame ignored", frame.id)
        return
    if isinstance(frame, ProtocolError):
        node.counters.errors[frame.code] += 1
        _fail(conn, frame.code, frame.message, frame.id)
        return
    node.counters.frames[_FRAME_TYPES[type(frame)]] += 1
    try:
        if isinstance(frame, JoinRoom):  # its ack may carry the stream's position, and comes after the replay
            outcome = await _join(node, conn, frame)
            if outcome is None:
                conn.streak.ok()
                return
        else:
            outcome = await _execute(node, conn, frame)
    except BrokerUnavailable as exc:
        outcome = (ErrorCode.UNAVAILABLE, unavailable_message(exc.maybe_published))
    if outcome is not None:
        node.counters.errors[outcome[0]] += 1
        _fail(conn, outcome[0], outcome[1], frame.id)
        return
    conn.streak.ok()
    if frame.id is not None and not isinstance(frame, Ping | PresenceQuery):
        conn.send(encode_ack(frame.id))


def _fail(conn: Connection, code: ErrorCode, message: str, fid: int | str | None) -> None:
    conn.send(encode_error(code, message, fid))
    if conn.streak.error():
        conn.close_soon(CloseCode.POLICY, "too many errors in a row")


async def _join(node: Node, conn: Connection, frame: JoinRoom) -> Outcome:
    """Join; on success the node sends the replay, then this frame's ack (with the position), then live messages."""
    if not await node.authorize(conn.identity, "join_room", frame.room):
        return (ErrorCode.FORBIDDEN, f"not allowed to join {frame.room!r}")
    fid = frame.id

    def ack(data: dict[str, Any] | None) -> None:
        if fid is not None:
            conn.send(encode_ack(fid, data))
    code = await node.join(conn.id, frame.room, frame.since, ack)
    return None if code is None else (code, JOIN_ERRORS[code])


async def _execute(node: Node, conn: Connection, frame: ClientFrame) -> Outcome:
    """Carry out one valid frame (not a join); returns the error to report, or None."""
    sender = conn.user_id
    match frame:
        case LeaveRoom(room=room):
            await node.leave(conn.id, room)
        case Ping(data=data, id=fid):
            conn.send(encode_message(Message(ServerType.PONG, data, id=fid).stamped()))
        case PresenceQuery(room=room, id=fid):
            if room not in node.rooms_of(conn.id):
                return (ErrorCode.NOT_IN_ROOM, f"join {room!r} before asking who is in it")
            found = await node.presence(room)
            conn.send(encode_presence(room, found.users, found.anonymous, fid))
        case Broadcast(data=data):
            if not await node.authorize(conn.identity, "broadcast", None):
                return (ErrorCode.FORBIDDEN, "client broadcast is disabled on this hub")
            await node.publish(Target("all"), Message("broadcast", data, user_id=sender))
        case RoomMessage(room=room, message=message):
            if room not in node.rooms_of(conn.id):
                return (ErrorCode.NOT_IN_ROOM, f"join {room!r} before sending to it")
            if not await node.authorize(conn.identity, "room_message", room):
                return (ErrorCode.FORBIDDEN, f"not allowed to send to {room!r}")
            data = {"room": room, "message": message}
            await node.publish(Target("room", room),
                               Message("room_message", data, room=room, user_id=sender))
        case PrivateMessage(user_id=to, message=message):
            if not await node.authorize(conn.identity, "private_message", to):
                return (ErrorCode.FORBIDDEN, "private messages are disabled on this hub")
            data = {"to": to, "message": message}
            await node.publish(Target("user", to), Message("private_message", data, user_id=sender))
    return None


_FRAME_TYPES: dict[type, str] = {
    JoinRoom: "join_room", LeaveRoom: "leave_room", Broadcast: "broadcast",
    RoomMessage: "room_message", PrivateMessage: "private_message", Ping: "ping", PresenceQuery: "presence",
}
