"""The WebSocket endpoint: handshake checks, one reader task per connection, dispatch.

Handshake refusals are HTTP errors before the upgrade, never a silent close
(PROTOCOL.md section 1). After the upgrade, bad input is answered with an
`error` frame and the connection stays open, until too many errors in a row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from hubnode.appkey import NODE
from hubnode.auth import AuthError, Identity
from hubnode.broker.base import BrokerUnavailable
from hubnode.connection import Connection
from hubnode.errors import JOIN_ERRORS, CloseCode, ErrorCode
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
    since_param,
    unavailable_message,
)
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


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """`GET /ws`: mount on any route of an aiohttp app whose `app[NODE]` is a Node."""
    node = request.app[NODE]
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
        return await _serve(node, request, conn_id, checked, since)
    finally:  # the upgrade failed or the handler was cancelled before the connection went live
        node.abandon(conn_id, checked.user_id)


async def _serve(node: Node, request: web.Request, conn_id: str, identity: Identity,
                 since: Since | None) -> web.StreamResponse:
    cfg = node.config
    # autoping off: the node's single ping task does the pinging, and pongs
    # reach the read loop as signs of life
    ws = web.WebSocketResponse(max_msg_size=cfg.max_message_bytes, compress=False, autoping=False)
    await ws.prepare(request)
    transport = request.transport
    if transport is None:
        return ws
    loop = asyncio.get_running_loop()
    conn = Connection(conn_id, identity, ws, transport,
                      max_outbound=cfg.max_outbound_bytes, bucket=TokenBucket(cfg.rate, cfg.burst),
                      streak=ErrorStreak(cfg.max_errors), now=loop.time())
    try:
        node.attach(conn, since)
    except NodeDraining:
        conn.send(reconnect_frame())
        await conn.close(CloseCode.GOING_AWAY, "node shutting down")
        return ws
    expiry = _expire_at(conn, loop)
    try:
        await _read_loop(node, conn, ws)
    finally:
        if expiry is not None:
            expiry.cancel()
        conn.closing = True  # nothing more may follow the close frame, whoever sent it
        try:
            await conn.wait_closed()
        finally:  # even when aiohttp cancels the handler because the peer is gone
            await node.disconnect(conn)
    return ws


def _expire_at(conn: Connection, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
    """Close with 1008 when the token expires (one timer, no task, per connection)."""
    expires_at = conn.identity.expires_at
    if expires_at is None:
        return None
    delay = max(0.0, expires_at - time.time())
    return loop.call_later(delay, conn.close_soon, CloseCode.POLICY, "token expired")


async def _read_loop(node: Node, conn: Connection, ws: web.WebSocketResponse) -> None:
    loop = asyncio.get_running_loop()
    async for msg in ws:
        if conn.closing:
            break
        now = conn.last_seen = loop.time()
        if msg.type is WSMsgType.TEXT:
            await _on_text(node, conn, msg.data, now)
        elif msg.type is WSMsgType.PING:
            await ws.pong(msg.data)
        elif msg.type is WSMsgType.PONG:
            continue
        elif msg.type is WSMsgType.BINARY:
            await conn.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
            break
        else:
            break


async def _on_text(node: Node, conn: Connection, text: str, now: float) -> None:
    frame = parse_frame(text)
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
            conn.send(encode_message(Message("pong", data, id=fid).stamped()))
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
