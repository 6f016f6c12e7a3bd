"""One client connection, served by a lean WebSocket protocol of the node's own.

aiohttp answers HTTP and checks the upgrade request; then the node writes the
`101` itself and takes the socket over (hubnode.ws). From there a connection
is this one `asyncio.Protocol` with `__slots__`: frames are parsed in
`data_received`, there is no task, reader queue or writer per connection, and
an idle connection costs a few hundred bytes of Python objects (aiohttp's
per-connection state was ~16 KB).

Outbound, `send(frame)` never blocks and never writes at once: the frame's
bytes (built once per message per node, in this socket's wire form) are
queued, and the node's `Flusher` gives each socket one write per loop
iteration, so a batch of messages from the subscriber costs each socket one
system call, not one per message. When the transport's buffer passes
`--max-outbound-bytes` the connection is a slow consumer: it is closed with
1013 and nothing else waits for it (the gorilla/centrifuge rule).

Inbound, frames that need the node (joins, publishes) run in order in a task
that exists only while the connection has frames to handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hubnode.errors import CloseCode
from hubnode.frames import DEFLATE, JSON, MSGPACK, Frame, close_frame, data_frame
from hubnode.policy import ErrorStreak, TokenBucket
from hubnode.wsreader import CLOSE, PING, TEXT, FrameReader, Violation

if TYPE_CHECKING:
    from hubnode.auth import Identity

__all__ = ["Connection", "Flusher"]

log = logging.getLogger(__name__)

# How long a close handshake may take before the socket is simply dropped; a
# slow consumer may never read its close frame.
CLOSE_TIMEOUT = 5.0
# Frames waiting for the connection's handler before the node stops reading from it.
INBOX_PAUSE = 32

OnFrame = Callable[["Connection", "str | bytes"], Awaitable[None]]
OnLost = Callable[["Connection"], Any]


class Flusher:
    """Gives every socket with queued frames one write, once per loop iteration."""

    __slots__ = ("_pending", "_scheduled")

    def __init__(self) -> None:
        self._pending: list[Connection] = []
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        self._pending.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for conn in pending:
            try:
                conn.flush()
            except Exception:  # never leave the others unflushed
                log.exception("writing to %s failed: dropping it", conn.id)
                conn.abort()


class Connection(asyncio.Protocol):
    """A WebSocket client as the node sees it, and the protocol serving its socket."""

    __slots__ = ("id", "identity", "user_id", "bucket", "streak", "closing", "slow", "last_seen",
                 "last_ping", "form", "expiry", "_transport", "_limit", "_min_compress", "_reader",
                 "_flusher", "_outbox", "_inbox", "_worker", "_on_frame", "_on_lost", "_lost",
                 "_close_timer", "_closed")

    def __init__(self, conn_id: str, identity: Identity, transport: asyncio.Transport, *,
                 max_outbound: int, bucket: TokenBucket, streak: ErrorStreak, flusher: Flusher,
                 on_frame: OnFrame, on_lost: OnLost, form: int = JSON, max_message: int = 0,
                 min_compress: int = 0) -> None:
        self.id = conn_id
        self.identity = identity
        self.user_id = identity.user_id
        self.last_seen = time.monotonic()  # of the last frame or pong from the client
        self.last_ping = self.last_seen
        self.bucket = bucket
        self.streak = streak
        self.closing = False
        self.slow = False
        self.form = form
        self.expiry: asyncio.TimerHandle | None = None  # the token's expiry
        self._transport = transport
        self._limit = max_outbound
        self._min_compress = min_compress
        self._reader = FrameReader(max_message, bool(form & DEFLATE))
        self._flusher = flusher
        self._outbox: list[bytes] | None = None
        self._inbox: list[str | bytes] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._lost = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None

    # -- outbound ------------------------------------------------------------
    def send(self, frame: Frame) -> bool:
        """Queue one server message in this socket's wire form; never blocks. False if not sent."""
        if self.closing:
            return False
        self._queue(frame.text if self.form == JSON else frame.wire(self.form, self._min_compress))
        return True

    def send_raw(self, data: bytes) -> bool:
        """Queue a frame that is the same in every form (a ping)."""
        if self.closing:
            return False
        self._queue(data)
        return True

    def _queue(self, data: bytes) -> None:
        out = self._outbox
        if out is None:
            self._outbox = [data]
            self._flusher.add(self)
        else:
            out.append(data)

    def flush(self) -> None:
        """Write what is queued in one call; a socket that cannot keep up is closed (1013)."""
        out, self._outbox = self._outbox, None
        transport = self._transport
        if not out or transport.is_closing():
            return
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        if not self.closing and transport.get_write_buffer_size() > self._limit:
            self.slow = True
            log.info("closing slow consumer %s: outbound buffer over %d bytes", self.id, self._limit)
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    # -- closing -------------------------------------------------------------
    def abort(self) -> None:
        """Drop a peer that stopped answering: no close handshake to wait for."""
        self.closing = True
        self._transport.abort()

    def close_soon(self, code: int, reason: str = "") -> None:
        """Send the close frame after what is queued; later sends are dropped at once.

        The socket is closed when the client answers, or dropped after
        CLOSE_TIMEOUT (a slow consumer may never read its close frame).
        """
        if self.closing:
            return
        self.closing = True
        self.flush()
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(close_frame(int(code), reason))
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    async def close(self, code: int, reason: str = "") -> None:
        """Close with `code` and wait until the socket is gone."""
        self.close_soon(code, reason)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._lost:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    # -- asyncio.Protocol ------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except Violation as exc:
            self._violated(exc.code, exc.reason)
            return
        if not messages:  # a partial frame is no sign of life: a trickle must not keep a peer alive
            return
        self.last_seen = time.monotonic()
        for op, payload in messages:
            if op <= 2:
                if (op == TEXT) == bool(self.form & MSGPACK):
                    self._violated(CloseCode.UNSUPPORTED_DATA,
                                   "text frames are not supported with hubnode.msgpack" if self.form & MSGPACK
                                   else "binary frames are not supported")
                    return
                if not self.closing:
                    self._take(payload)
            elif op == PING:
                if not self.closing and self.bucket.take(self.last_seen):  # pings count against --rate
                    self._queue(data_frame(0x8A, payload))  # type: ignore[arg-type]
            elif op == CLOSE:
                self._peer_closed(payload)  # type: ignore[arg-type]
                return

    def _violated(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7): the close frame, then our end of the socket; what
        the peer still sends is read and dropped, never handled.

        A socket closed with unread bytes in its receive buffer sends a TCP reset, and a reset can
        destroy the close frame before the peer reads it: a client that sent a bad frame and then
        more would see 1006 instead of the reason. So: FIN after the close frame, and the socket is
        closed when the peer closes its end (or by the close timer, for one that never does).
        """
        log.info("closing %s with %d: %s", self.id, code, reason)
        self._inbox = None
        self._reader.failed = True
        self.close_soon(code, reason)
        transport = self._transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.resume_reading()
            transport.write_eof()
        else:
            transport.close()

    def _peer_closed(self, payload: bytes) -> None:
        """The client's close frame: answered (unless it answers ours), then the socket is closed."""
        transport = self._transport
        if not self.closing:
            self.closing = True
            self.flush()
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CloseCode.NORMAL
            transport.write(close_frame(code))
        self._inbox = None
        transport.close()  # waits for the write buffer to drain: bounded, or a peer that stops reading stays
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def _take(self, payload: str | bytes) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = []
        inbox.append(payload)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        elif len(inbox) >= INBOX_PAUSE:
            self._transport.pause_reading()

    async def _work(self) -> None:
        """Handle the connection's frames in order; the task ends when none are left."""
        try:
            while self._inbox:
                payload = self._inbox.pop(0)
                if len(self._inbox) == INBOX_PAUSE // 2 and not self._transport.is_closing():
                    self._transport.resume_reading()
                try:
                    await self._on_frame(self, payload)
                except Exception:
                    log.exception("handling a frame of %s failed", self.id)
                self.last_seen = time.monotonic()  # reading may be paused meanwhile: the client is not silent
        finally:
            self._worker = None
            self._inbox = None
            if self._lost:  # the socket went while a frame was handled: forget it now the frame is done
                self._on_lost(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self._lost = True
        self._outbox = None
        for handle in (self._close_timer, self.expiry):
            if handle is not None:
                handle.cancel()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._worker is None:
            self._on_lost(self)
        else:
            self._inbox = None

