"""HubClient: one connection to the hub that stays up (see hubnode.client for what it does).

The I/O layer: a task per client runs the connection loop (connect, serve,
back off, again), a task per connection writes its frames in order; every
rule about positions and member lists is hubnode.client.state's, and every
byte in or out goes through hubnode.client.codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import aiohttp
    from yarl import URL
except ImportError as missing:  # `pip install hubnode` alone: the publisher, not the client
    raise ImportError("hubnode.client needs aiohttp: pip install 'hubnode[client]'") from missing

from hubnode.client.codec import Frame, data_of, decode, encode
from hubnode.client.errors import (
    BadServerFrame,
    ClientClosed,
    Disconnected,
    HandshakeRefused,
    HubError,
    LeftRoom,
    RequestFailed,
    RequestTimeout,
)
from hubnode.client.state import MemberLists, Position, Streams
from hubnode.errors import CloseCode, ErrorCode
from hubnode.wire import MSGPACK_PROTOCOL, ClientType, ServerType, SystemEvent

__all__ = ["HubClient"]

log = logging.getLogger("hubnode.client")

Token = str | Callable[[], str | Awaitable[str]] | None
Handler = Callable[[Frame], Any]

# Requests that may be sent again on a new connection: their effect does not add up.
_RESENDABLE = {ClientType.JOIN_ROOM, ClientType.LEAVE_ROOM}
# Frame types that answer a request (they carry its id).
_ANSWERS = {ServerType.ACK, ServerType.ERROR, ServerType.PONG, ServerType.PRESENCE}
# What a failed join or re-join leaves alone: the room stays wanted.
_TRANSIENT = {"timeout", "disconnected", "left", "closed"}


@dataclass(slots=True)
class _Request:
    type: ClientType
    data: Any
    future: asyncio.Future[Frame]
    timer: asyncio.TimerHandle | None = None
    sent: bool = False
    payload: bytes | str | None = None  # the encoded frame; joins are encoded when sent (their `since` may change)
    since: Position | None = None  # a join's `since`, given by the application
    rejoin: bool = False  # set when a join is sent: the room was joined on an earlier connection
    sent_since: Position | None = None


@dataclass(slots=True)
class _Link:
    """One WebSocket connection and the frames waiting to go out on it, in order."""

    ws: aiohttp.ClientWebSocketResponse
    outbox: asyncio.Queue[bytes | str] = field(default_factory=asyncio.Queue)
    opened_at: float = 0.0  # monotonic time of its `connected` frame; 0 before it


class _End:
    """Queued when the client stops: iteration ends (or raises `error`)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class HubClient:
    """A connection to the hub that stays up: see the module docstring for what it does for you.

    url: a WebSocket URL (`ws://host:port/ws`, behind a load balancer or of
    one node) or a list of node URLs, tried in turn. token: a JWT, or a
    function returning one (or a coroutine function), asked on every connect.
    Delays and timeouts are in seconds. queue_size bounds the messages waiting
    for `async for`: past it the client reads no more from the node until the
    application catches up (the node holds what follows, as for any slow
    socket); 0 queues nothing (use `on()` handlers only).
    """

    def __init__(self, url: str | Sequence[str], *, user_id: str | None = None, token: Token = None,
                 msgpack: bool = False, compress: bool = True, presence: bool = False, reconnect: bool = True,
                 min_delay: float = 0.5, max_delay: float = 15.0, stable_after: float = 10.0,
                 timeout: float = 10.0, heartbeat: float | None = 25.0, queue_size: int = 10_000,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.urls = [url] if isinstance(url, str) else [str(u) for u in url]
        if not self.urls:
            raise ValueError("HubClient needs at least one URL")
        self.user_id, self.token, self.msgpack, self.compress = user_id, token, msgpack, compress
        self.reconnect, self.timeout, self.heartbeat = reconnect, timeout, heartbeat
        self.min_delay, self.max_delay, self.stable_after = min_delay, max_delay, stable_after
        self.info: dict[str, Any] | None = None  # data of the last `connected` frame: conn_id, user_id, node
        self.url: str | None = None  # the URL of the current (or last) attempt
        self.attempts = 0  # failed attempts since the last stable connection: the backoff's exponent
        self._session, self._own_session = session, session is None
        self._streams = Streams()
        self._members = MemberLists() if presence else None
        self._handlers: dict[str, list[Handler]] = {}
        self._pending: dict[int, _Request] = {}
        self._next_id = 1
        self._queue: asyncio.Queue[Frame | _End] = asyncio.Queue()
        self._queue_size = queue_size
        self._drained = asyncio.Event()  # set while the queue has room: the reader waits on it
        self._link: _Link | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None  # settles on the first `connected` (or a fatal error)
        self._farewell: dict[str, Any] | None = None  # the `disconnect` system message before a close 4000/4001
        self._going_away = False  # the node announced it is draining
        self._closed = False
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._opened_at = 0.0  # when the last connection got its `connected` frame (0: it never did)

    # -- life ---------------------------------------------------------------------------
    async def connect(self, timeout: float | None = None) -> HubClient:
        """Connect, and return once the node's `connected` frame is in.

        Retries with backoff (over the URLs) until `timeout` (default: the
        client's) has passed; then raises RequestTimeout. A refused handshake
        (HTTP 4xx: bad token, origin, user) raises HandshakeRefused at once.
        """
        if self._closed:
            raise ClientClosed("the client was closed")
        if self._run_task is None:
            self._first = asyncio.get_running_loop().create_future()
            self._run_task = asyncio.create_task(self._run(), name="hubnode.client")
        assert self._first is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout or self.timeout)
        except TimeoutError:
            await self.close()
            raise RequestTimeout(f"no connection to {self.urls} within {timeout or self.timeout} s") from None
        except BaseException:  # refused, a foreign server, or the caller cancelled: nothing stays open
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close for good: pending requests raise ClientClosed, iteration ends, no reconnect."""
        link = self._link
        self._shutdown(None)
        try:
            if link is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.ws.close(code=CloseCode.NORMAL), 1.0)
            me = asyncio.current_task()
            task, self._run_task = self._run_task, None
            stopping = [t for t in (task, *self._tasks) if t is not None and t is not me and not t.done()]
            for t in stopping:
                t.cancel()
            await asyncio.gather(*stopping, return_exceptions=True)
        finally:
            await self._close_session()

    async def _close_session(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> HubClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.opened_at > 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def node(self) -> str | None:
        return self.info.get("node") if self.info else None

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this client is in (or will re-join): its own joins and the server's."""
        return frozenset(self._streams.rooms)

    # -- requests ----------------------------------------------------------------------
    async def join(self, room: str, since: Position | Mapping[str, Any] | None = None,
                   timeout: float | None = None) -> Frame:
        """Join `room` (kept across reconnects); `since` a position the application already has."""
        if since is not None and not isinstance(since, Position):
            since = Position(int(since["offset"]), str(since["epoch"]))
        self._streams.rooms.add(room)
        try:
            return await self._request(ClientType.JOIN_ROOM, room, timeout, since=since)
        except HubError as err:
            if err.code not in _TRANSIENT:
                self._forget(room)
            raise

    async def leave(self, room: str, timeout: float | None = None) -> Frame:
        self._forget(room)
        for fid, req in list(self._pending.items()):
            if not req.sent and req.type == ClientType.JOIN_ROOM and req.data == room:
                self._settle(fid, LeftRoom(f"left {room!r} before the join was sent"))
        if not self.connected:  # a new connection starts in no room
            return {"type": ServerType.ACK.value}
        return await self._request(ClientType.LEAVE_ROOM, room, timeout)

    async def send_to_room(self, room: str, message: Any, timeout: float | None = None) -> Frame:
        return await self._request(ClientType.ROOM_MESSAGE, {"room": room, "message": message}, timeout)

    async def send_private(self, user_id: str, message: Any, timeout: float | None = None) -> Frame:
        return await self._request(ClientType.PRIVATE_MESSAGE, {"user_id": user_id, "message": message}, timeout)

    async def broadcast(self, data: Any, timeout: float | None = None) -> Frame:
        return await self._request(ClientType.BROADCAST, data, timeout)

    async def ping(self, data: Any = None, timeout: float | None = None) -> Frame:
        """The node's `pong` frame, echoing `data`."""
        return await self._request(ClientType.PING, data, timeout)

    async def presence(self, room: str, timeout: float | None = None) -> dict[str, Any]:
        """Who is in `room` (joined by this client), cluster-wide: {"users": {user: connections}, "anonymous": n}."""
        answer = await self._request(ClientType.PRESENCE, room, timeout)
        data = data_of(answer)
        return {"users": dict(data.get("users") or {}), "anonymous": data.get("anonymous") or 0}

    def members(self, room: str) -> dict[str, Any] | None:
        """With presence=True: the member list kept for `room`, or None before its first answer."""
        return self._members.members(room) if self._members else None

    def position(self, room: str | None = None) -> Position | None:
        """The last position delivered to the application: of `room`, or of the user's own stream."""
        return self._streams.position(room)

    # -- messages -------------------------------------------------------------------------
    def on(self, type: str, handler: Handler) -> HubClient:
        """Call `handler(frame)` for frames of `type` ("*": all of the node's); a coroutine function runs as a task.

        Types are the server's (room_message, connected, presence, any
        published type), a system message's event (reconnect, resync,
        disconnect, joined, left), and the client's own: disconnected {code,
        reason, delay}, recovered {stream, room, recovered, offset, epoch},
        members {room, users, anonymous, change}, error (not tied to a request).
        """
        self._handlers.setdefault(type, []).append(handler)
        return self

    def off(self, type: str, handler: Handler) -> HubClient:
        with contextlib.suppress(KeyError, ValueError):
            self._handlers[type].remove(handler)
        return self

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self

    async def __anext__(self) -> Frame:
        """The next message or event, in arrival order; the end when the client stops for good."""
        item = await self._queue.get()
        if not self._queue_full():
            self._drained.set()  # the reader may go on
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # every later iteration ends too
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    # -- the connection loop -----------------------------------------------------------------
    async def _run(self) -> None:
        index = 0
        try:
            while not self._closed:
                url = self.urls[index % len(self.urls)]
                index += 1
                code, reason = await self._attempt(url)
                if self._closed:
                    return
                delay = self._closed_with(code, reason)
                if delay is None:
                    return
                await asyncio.sleep(delay)
        finally:
            if self._closed:  # stopped for good (4000, a fault, no reconnect): nothing stays open
                await self._close_session()

    async def _attempt(self, url: str) -> tuple[int, str]:
        """One connection, from handshake to close: the close code and reason (1006 when none came)."""
        self._opened_at = 0.0
        try:
            target = await self._target(url)
            if self._session is None:
                self._session = aiohttp.ClientSession()
            ws = await self._session.ws_connect(
                target, protocols=(MSGPACK_PROTOCOL,) if self.msgpack else (), compress=15 if self.compress else 0,
                heartbeat=self.heartbeat, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as err:
            if self._first is not None and not self._first.done() and 400 <= err.status < 500 and err.status != 429:
                self._fail(HandshakeRefused(f"{url} refused the handshake: HTTP {err.status} {err.message}",
                                            err.status))
            return 1006, f"handshake refused: HTTP {err.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return 1006, f"cannot connect: {err}"
        except Exception as err:  # a token function that raised: a failed attempt, like a refusal
            return 1006, f"cannot connect: {err!r}"
        if self.msgpack and ws.protocol != MSGPACK_PROTOCOL:
            self._fail(BadServerFrame(f"{url} did not accept the {MSGPACK_PROTOCOL} subprotocol"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
            return 1006, "subprotocol refused"
        return await self._serve(_Link(ws))

    async def _target(self, url: str) -> URL:
        target = URL(url)
        query: dict[str, str] = {}
        if self.user_id:
            query["user_id"] = self.user_id
        token = self.token() if callable(self.token) else self.token
        if inspect.isawaitable(token):
            token = await token
        if token:
            query["token"] = str(token)
        since = self._streams.connecting()
        if since is not None:
            query["since"] = f"{since.offset}:{since.epoch}"
        target = target.update_query(query) if query else target
        self.url = str(target)
        return target

    async def _serve(self, link: _Link) -> tuple[int, str]:
        self._link = link
        writer = asyncio.create_task(self._write(link))
        try:
            while True:
                msg = await link.ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    code = link.ws.close_code or (msg.data if isinstance(msg.data, int) else None) or 1006
                    return code, msg.extra if isinstance(msg.extra, str) else ""
                if msg.type == aiohttp.WSMsgType.ERROR:
                    return 1006, str(msg.data)
                try:
                    frame = self._decode(msg)
                except BadServerFrame as err:
                    self._fail(err)  # first: a peer that never answers the close must not hide the error
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(link.ws.close(code=1002, message=b"not a hub frame"), 1.0)
                    return 1002, str(err)
                self._dispatch(link, frame)
                if self._queue_full():  # the application is behind: read no more until it catches up
                    self._drained.clear()
                    await self._drained.wait()
        finally:
            writer.cancel()
            self._opened_at = link.opened_at
            if self._link is link:
                self._link = None

    async def _write(self, link: _Link) -> None:
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
            while True:
                data = await link.outbox.get()
                if isinstance(data, bytes):
                    await link.ws.send_bytes(data)
                else:
                    await link.ws.send_str(data)

    def _decode(self, msg: aiohttp.WSMessage) -> Frame:
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            raise BadServerFrame(f"the server sent a {msg.type.name.lower()} frame")
        return decode(msg.data, msg.type == aiohttp.WSMsgType.BINARY, self.msgpack)

    # -- frames in -----------------------------------------------------------------------------
    def _dispatch(self, link: _Link, frame: Frame) -> None:
        ftype, fid = frame["type"], frame.get("id")
        if fid is not None and ftype in _ANSWERS and fid in self._pending:
            self._answer(fid, frame)
            return
        if fid is not None and ftype == ServerType.PRESENCE:
            return  # a late answer (it timed out): not an event
        if ftype == ServerType.CONNECTED:
            recovery = self._on_connected(link, data_of(frame))
            self._emit(frame)
            if recovery is not None:
                self._emit(recovery, own=True)
            return
        if not self._streams.track(frame):
            return  # delivered already (a replayed message's live copy)
        data = frame.get("data")
        if ftype == ServerType.SYSTEM_MESSAGE and isinstance(data, dict) and isinstance(data.get("event"), str):
            self._system_message(data)
            self._emit(frame, data["event"])
        self._emit(frame)
        if ftype == ServerType.PRESENCE and self._members is not None:
            members = self._members.event(frame.get("room", ""), data)
            if members is not None:
                self._emit(members, own=True)

    def _answer(self, fid: int, frame: Frame) -> None:
        req = self._pending[fid]
        if frame["type"] == ServerType.ERROR:
            data = data_of(frame)
            code = str(data.get("code") or "error")
            self._settle(fid, RequestFailed(str(data.get("message") or code), code))
            return
        if frame["type"] == ServerType.ACK and req.type == ClientType.JOIN_ROOM:
            recovered = self._streams.joined(req.data, frame.get("data"), req.rejoin, req.sent_since)
            if req.data in self._streams.rooms:
                self._ask_presence(req.data)
            self._settle(fid, None, frame)
            if recovered is not None:
                self._emit(recovered, own=True)
            return
        self._settle(fid, None, frame)

    def _system_message(self, data: dict[str, Any]) -> None:
        event, room = data["event"], data.get("room")
        if event == SystemEvent.RECONNECT:
            self._going_away = True
        elif event == SystemEvent.DISCONNECT:
            self._farewell = data
        elif event == SystemEvent.JOINED and isinstance(room, str):
            # The application's leave reaches the node after this join: it holds.
            if not self._in_flight(ClientType.LEAVE_ROOM, room):
                self._streams.server_joined(room, data)
                self._ask_presence(room)
        elif event == SystemEvent.LEFT and isinstance(room, str):
            self._forget(room)
            # A join already on its way would put the connection back: a leave after it is read after it.
            if self._in_flight(ClientType.JOIN_ROOM, room):
                self._background(self._register(ClientType.LEAVE_ROOM, room, None))
        elif event == SystemEvent.RESYNC and self._members is not None:
            for r in self._streams.rooms:
                self._ask_presence(r)

    def _on_connected(self, link: _Link, info: dict[str, Any]) -> dict[str, Any] | None:
        """The connection is routable: re-join rooms, then send what waited."""
        previous, self.info = self.info, info
        recovery = self._streams.connected(info, previous is not None, previous.get("user_id") if previous else None)
        link.opened_at = time.monotonic()
        self._going_away = False
        waiting = [(fid, req) for fid, req in self._pending.items() if not req.sent]
        joining = {req.data for _, req in waiting if req.type == ClientType.JOIN_ROOM}
        for room in sorted(self._streams.rooms - joining):  # sent first: what waited may need the rooms
            self._background(self._rejoined(room, self._register(ClientType.JOIN_ROOM, room, None)))
        for fid, req in waiting:
            self._transmit(fid, req)
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        return recovery

    async def _rejoined(self, room: str, answer: asyncio.Future[Frame]) -> None:
        try:
            await answer
        except HubError as err:
            if err.code in _TRANSIENT:
                return
            self._forget(room)  # e.g. forbidden: the application learns it through an `error` event
            self._emit({"type": "error", "room": room, "data": {"code": err.code, "message": str(err)}}, own=True)

    # -- member lists ----------------------------------------------------------------------------
    def _ask_presence(self, room: str) -> None:
        if self._members is not None and room in self._streams.rooms:
            self._background(self._query_members(self._members, room, self._members.ask(room)))

    async def _query_members(self, members: MemberLists, room: str, serial: int) -> None:
        try:
            answer = await self.presence(room)
        except HubError as err:
            event = members.failed(room, serial)
            if event is not None:
                self._emit(event, own=True)
            # Not a drop or a leave (those re-ask on the next join ack): try again in a while.
            if err.code not in {"disconnected", "closed", "left", ErrorCode.NOT_IN_ROOM} and self.connected:
                await asyncio.sleep(self.min_delay)
                if members.current(room, 0) and not self._closed:  # no newer query started meanwhile
                    self._ask_presence(room)
            return
        event = members.answered(room, serial, answer["users"], answer["anonymous"])
        if event is not None:
            self._emit(event, own=True)

    # -- frames out --------------------------------------------------------------------------------
    async def _request(self, ftype: ClientType, data: Any, timeout: float | None,
                       since: Position | None = None) -> Frame:
        future = self._register(ftype, data, timeout, since)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up: a request not sent yet never will be
            self._withdraw(future)
            raise

    def _register(self, ftype: ClientType, data: Any, timeout: float | None,
                  since: Position | None = None) -> asyncio.Future[Frame]:
        """Queue a request (sent now when connected, else on the next connection): its answer's future.

        Raises at once for a client closed for good, and for data the wire form cannot carry.
        """
        if self._closed:
            raise ClientClosed("the client was closed")
        fid, self._next_id = self._next_id, self._next_id + 1
        # Encoded now, so a value JSON (or msgpack) cannot carry fails here, in the caller. Joins are
        # encoded when sent: their `since` is the position at that moment.
        payload = None if ftype == ClientType.JOIN_ROOM else self._encode({"type": ftype.value, "data": data,
                                                                          "id": fid})
        loop = asyncio.get_running_loop()
        req = _Request(ftype, data, loop.create_future(), payload=payload, since=since)
        wait = self.timeout if timeout is None else timeout
        req.timer = loop.call_later(wait, self._settle, fid, RequestTimeout(f"{ftype.value} got no answer within "
                                                                             f"{wait} s"))
        self._pending[fid] = req
        if self.connected:
            self._transmit(fid, req)
        return req.future

    def _withdraw(self, future: asyncio.Future[Frame]) -> None:
        for fid, req in list(self._pending.items()):
            if req.future is future:
                del self._pending[fid]
                if req.timer is not None:
                    req.timer.cancel()

    def _encode(self, frame: Frame) -> bytes | str:
        return encode(frame, self.msgpack)

    def _transmit(self, fid: int, req: _Request) -> None:
        assert self._link is not None
        payload = req.payload
        if payload is None:  # a join
            data, req.rejoin, req.sent_since = self._streams.join_data(req.data, req.since)
            payload = self._encode({"type": req.type.value, "data": data, "id": fid})
        req.sent = True
        self._link.outbox.put_nowait(payload)

    def _settle(self, fid: int, error: BaseException | None, frame: Frame | None = None) -> None:
        req = self._pending.pop(fid, None)
        if req is None:
            return
        if req.timer is not None:
            req.timer.cancel()
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            assert frame is not None
            req.future.set_result(frame)

    def _in_flight(self, ftype: ClientType, room: str) -> bool:
        return any(r.sent and r.type == ftype and r.data == room for r in self._pending.values())

    # -- closing ----------------------------------------------------------------------------------
    def _closed_with(self, code: int, reason: str) -> float | None:
        """A connection ended: settle what was in flight, and the delay before the next attempt (None: stop)."""
        for fid, req in list(self._pending.items()):
            if req.sent:
                if req.type in _RESENDABLE:
                    req.sent = False
                else:
                    self._settle(fid, Disconnected("connection lost before the answer"))
        farewell, self._farewell = self._farewell, None
        stop = code == CloseCode.DISCONNECTED or (
            code != CloseCode.DISCONNECTED_RECONNECT and farewell is not None and farewell.get("reconnect") is False)
        if farewell and isinstance(farewell.get("reason"), str) and farewell["reason"]:
            reason = farewell["reason"]  # the operator's words
        delay = None if stop or not self.reconnect or self._error is not None else self._next_delay(code)
        self._going_away = False  # only the close that follows the announcement is special
        self._emit({"type": "disconnected", "code": code, "reason": reason, "delay": delay}, own=True)
        if delay is None:
            error = self._error
            if error is None and not stop and self._first is not None and not self._first.done():
                error = Disconnected(f"could not connect to {self.url}: {reason} (code {code})")  # reconnect=False
            self._shutdown(error)
        return delay

    def _next_delay(self, code: int) -> float:
        """Draining node: go now, with jitter so its clients do not all arrive at once. Else backoff."""
        if self._opened_at and time.monotonic() - self._opened_at >= self.stable_after:
            self.attempts = 0  # the connection was stable: the backoff starts over
        if code == CloseCode.GOING_AWAY or self._going_away:
            return random.random() * 0.1
        delay = min(self.max_delay, self.min_delay * 2 ** self.attempts)
        self.attempts += 1
        return float(delay * (0.5 + random.random() / 2))

    def _fail(self, error: HubError) -> None:
        """A fault no reconnect mends: stop, and raise `error` from connect() and iteration."""
        self._error = error
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
            self._first.exception()  # retrieved here: connect() may not be waiting for it
        self._shutdown(error)

    def _shutdown(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        for fid in list(self._pending):
            self._settle(fid, error if error is not None else ClientClosed("the client was closed"))
        if self._first is not None and not self._first.done():
            self._first.set_exception(error or ClientClosed("the client was closed"))
            self._first.exception()
        self._queue.put_nowait(_End(error))

    def _forget(self, room: str) -> None:
        self._streams.forget(room)
        if self._members is not None:
            self._members.forget(room)

    # -- delivery ----------------------------------------------------------------------------------
    def _queue_full(self) -> bool:
        return 0 < self._queue_size <= self._queue.qsize()

    def _emit(self, frame: Frame, event: str | None = None, own: bool = False) -> None:
        """Hand `frame` to its handlers and to iteration (`event`: only to the handlers of that name).

        `own`: one of the client's events, not a frame of the node's: as in hub.js, "*" handlers do
        not get it (iteration does).
        """
        names = (event,) if event is not None else (frame["type"],) if own else (frame["type"], "*")
        for name in names:
            handlers = self._handlers.get(name)
            for handler in tuple(handlers) if handlers else ():  # a copy: a handler may call off()
                try:
                    result = handler(frame)
                except Exception:  # the application's bug must not stop the client (hub.js logs it too)
                    log.exception("a %r handler of hubnode.client raised", name)
                    continue
                if inspect.isawaitable(result):
                    self._background(result)
        if event is None and self._queue_size != 0:
            self._queue.put_nowait(frame)

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here: a background request's HubError needs no one
        if error is not None and not isinstance(error, HubError):
            log.error("a task of hubnode.client raised", exc_info=error)

