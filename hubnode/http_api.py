"""The per-node HTTP API of docs/http-api.md.

Any node answers for the whole cluster: reads go to the membership store
(Redis in cluster mode), publishes go through the broker like every message.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from hubnode.appkey import NODE
from hubnode.broker.base import BrokerUnavailable
from hubnode.dashboard_api import cluster_metrics, live_nodes, metrics_snapshot
from hubnode.metrics import LATENCY
from hubnode.node import Node
from hubnode.protocol import encodable, unavailable_message
from publisher.control import Command
from publisher.history import MAX_LIMIT
from publisher.message import MessageError
from publisher.names import check_name
from publisher.targets import posted_message

__all__ = ["add_routes", "with_api_key"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"ok": False, "error": {"code": code, "message": message}}, status)


def _node(request: web.Request) -> Node:
    return request.app[NODE]


def with_api_key(handler: Handler) -> Handler:
    """Require `Authorization: Bearer <key>` when --api-key is set.

    A wrapper on the guarded routes rather than an app middleware: a
    middleware's frame would stay alive under every open WebSocket handler.
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        keys = _node(request).config.api_key
        if keys:
            given = request.headers.get("Authorization", "")
            token = given[7:].encode() if given.startswith("Bearer ") else b""
            # compare against every key so timing does not reveal which one matched
            matched = [hmac.compare_digest(token, k.encode()) for k in keys]
            if not any(matched):
                return _error(401, "unauthorized", "missing or wrong API key")
        try:
            return await handler(request)
        except BrokerUnavailable as exc:  # a read of the cluster's state while Redis cannot answer
            return _error(503, "unavailable", str(exc))

    return guarded


async def _json_body(request: web.Request, empty: Any = None) -> Any:
    """The parsed JSON body of a POST, or the error to answer (`empty`: what a blank body means, else invalid).

    JSON only: a web page cannot send application/json cross-origin without
    a CORS preflight this API never grants, so no browser can forge a
    broadcast or a control command with a form.
    """
    if request.content_type != "application/json":
        return _error(415, "bad_message", "Content-Type must be application/json")
    body = await request.read()
    if empty is not None and not body.strip():
        return empty
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(400, "bad_json", "body is not valid JSON")


async def post_broadcast(request: web.Request) -> web.Response:
    node = _node(request)
    raw = await _json_body(request)
    if isinstance(raw, web.Response):
        return raw
    try:
        target, msg = posted_message(raw)
    except MessageError as exc:
        code = "bad_room" if "'room'" in str(exc) else "bad_message"
        return _error(400, code, str(exc))
    if not encodable(msg.data):
        return _error(400, "bad_message", "'data' nests too deeply")
    if not node.broker.connected:
        return _error(503, "unavailable", unavailable_message(False))
    try:
        await node.publish(target, msg)
    except MessageError as exc:  # a type reserved for the node, or a message too large
        return _error(400, "bad_message", str(exc))
    except BrokerUnavailable as exc:
        return _error(503, "unavailable", unavailable_message(exc.maybe_published))
    return _json({"ok": True}, 202)


async def get_stats(request: web.Request) -> web.Response:
    stats = await _node(request).stats()
    return _json({"clients": stats.clients, "rooms": stats.rooms, "nodes": stats.nodes})


async def get_rooms(request: web.Request) -> web.Response:
    return _json({"rooms": await _node(request).rooms()})


async def get_room(request: web.Request) -> web.Response:
    room = request.match_info["room"]
    problem = check_name(room)
    if problem:
        return _error(400, "bad_room", f"room name {problem}")
    members = await _node(request).room_clients(room)
    return _json({"room": room, "members": [
        {"conn_id": m.conn_id, "user_id": m.user_id, "node": m.node} for m in members]})


async def get_room_presence(request: web.Request) -> web.Response:
    """`{"room", "users": {user: connections}, "anonymous"}`, cluster-wide (docs/protocol.md)."""
    room = request.match_info["name"]
    problem = check_name(room)
    if problem:
        return _error(400, "bad_room", f"room name {problem}")
    found = await _node(request).presence(room)  # BrokerUnavailable: 503, from with_api_key
    return _json(found.to_json())


# -- server-side control (docs/protocol.md) ------------------------------------

async def post_user_disconnect(request: web.Request) -> web.Response:
    return await _disconnect(request, user=request.match_info["user"])


async def post_connection_disconnect(request: web.Request) -> web.Response:
    return await _disconnect(request, conn=request.match_info["conn"])


async def _disconnect(request: web.Request, user: str | None = None, conn: str | None = None) -> web.Response:
    """Body `{"reason": str, "reconnect": bool}`, both optional; JSON only, like /broadcast (no forged form posts)."""
    raw = await _json_body(request, empty={})
    if isinstance(raw, web.Response):
        return raw
    if not isinstance(raw, dict):
        return _error(400, "bad_message", 'body must be {"reason": str, "reconnect": bool}')
    unknown = sorted(set(raw) - {"reason", "reconnect"})
    if unknown:
        return _error(400, "bad_message", f"unknown field {unknown[0][:40]!r}: expected reason and reconnect")
    return await _command(request, _make(lambda: Command("disconnect", user=user, conn=conn,
                                                         reason=raw.get("reason", ""),
                                                         reconnect=raw.get("reconnect", False))))


async def put_user_room(request: web.Request) -> web.Response:
    return await _command(request, _room_command(request, "join"))


async def delete_user_room(request: web.Request) -> web.Response:
    return await _command(request, _room_command(request, "leave"))


def _room_command(request: web.Request, op: str) -> Command | web.Response:
    room = request.match_info["room"]
    problem = check_name(room)
    if problem:
        return _error(400, "bad_room", f"room name {problem}")
    return _make(lambda: Command(op, user=request.match_info["user"], room=room))  # type: ignore[arg-type]


def _make(build: Callable[[], Command]) -> Command | web.Response:
    try:
        return build()
    except MessageError as exc:
        return _error(400, "bad_message", str(exc))


async def _command(request: web.Request, command: Command | web.Response) -> web.Response:
    """Publish a command; `{"ok": true, "nodes": n}`: how many nodes took it."""
    if isinstance(command, web.Response):
        return command
    node = _node(request)
    if not node.broker.connected:
        return _error(503, "unavailable", unavailable_message(False))
    try:
        nodes = await node.control(command)
    except BrokerUnavailable as exc:
        return _error(503, "unavailable", unavailable_message(exc.maybe_published))
    return _json({"ok": True, "nodes": nodes})


async def get_room_history(request: web.Request) -> web.Response:
    return await _history(request, "room")


async def get_user_history(request: web.Request) -> web.Response:
    return await _history(request, "user")


async def _history(request: web.Request, kind: str) -> web.Response:
    """`?since=O&limit=L`: the stream's messages above O, oldest first (docs/protocol.md).

    `epoch` is null for a stream without history. Reading never creates one.
    """
    name = request.match_info["name"]
    problem = check_name(name)
    if problem:
        return _error(400, "bad_room" if kind == "room" else "bad_message",
                      f"{'room name' if kind == 'room' else 'user id'} {problem}")
    try:
        since = _query_int(request, "since", 0, 0, None)
        limit = _query_int(request, "limit", 100, 1, MAX_LIMIT)
    except ValueError as exc:
        return _error(400, "bad_message", str(exc))
    try:
        found = await _node(request).stream_history(kind, name, since, limit)
    except BrokerUnavailable as exc:
        return _error(503, "unavailable", f"history cannot be read now: {exc}")
    return _json(found.to_json())


def _query_int(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or int(raw) < low or (
            high is not None and int(raw) > high):
        expected = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise ValueError(f"{name} {raw[:40]!r}: expected a whole number {expected}")
    return int(raw)


async def get_healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "node": _node(request).id})


async def get_readyz(request: web.Request) -> web.Response:
    reason = _node(request).unready_reason
    if reason is None:
        return _json({"ready": True})
    return _json({"ready": False, "reason": reason}, 503)


async def get_nodes(request: web.Request) -> web.Response:
    """Live nodes with clients and heartbeat age; `self` is the node answering."""
    node = _node(request)
    return _json({"self": node.id, "nodes": await live_nodes(node)})


async def get_metrics_json(request: web.Request) -> web.Response:
    """This node's cumulative counters and latency histogram (rates: diff two samples)."""
    return _json(metrics_snapshot(_node(request), request.app.get(LATENCY)))


async def get_cluster_metrics(request: web.Request) -> web.Response:
    """Every live node's snapshot (the dashboard's feed: right whichever node a balancer picks)."""
    return _json({"nodes": await cluster_metrics(_node(request), request.app.get(LATENCY))})


def add_routes(app: web.Application) -> None:
    """/broadcast and /api/* need the API key (when set); health and readiness never do.

    Path names match any characters but '/' (aiohttp's default also refuses
    braces), so a name breaking the naming rules reaches its handler and gets
    a 400 saying why, not a bare 404.
    """
    app.router.add_post("/broadcast", with_api_key(post_broadcast))
    app.router.add_get("/api/stats", with_api_key(get_stats))
    app.router.add_get("/api/rooms", with_api_key(get_rooms))
    app.router.add_get("/api/rooms/{room:[^/]+}", with_api_key(get_room))
    app.router.add_get("/api/rooms/{name:[^/]+}/history", with_api_key(get_room_history))
    app.router.add_get("/api/rooms/{name:[^/]+}/presence", with_api_key(get_room_presence))
    app.router.add_post("/api/users/{user:[^/]+}/disconnect", with_api_key(post_user_disconnect))
    app.router.add_post("/api/connections/{conn:[^/]+}/disconnect", with_api_key(post_connection_disconnect))
    app.router.add_put("/api/users/{user:[^/]+}/rooms/{room:[^/]+}", with_api_key(put_user_room))
    app.router.add_delete("/api/users/{user:[^/]+}/rooms/{room:[^/]+}", with_api_key(delete_user_room))
    app.router.add_get("/api/users/{name:[^/]+}/history", with_api_key(get_user_history))
    app.router.add_get("/api/nodes", with_api_key(get_nodes))
    app.router.add_get("/api/metrics", with_api_key(get_metrics_json))
    app.router.add_get("/api/cluster/metrics", with_api_key(get_cluster_metrics))
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
