"""One client connection: identity, limits and a non-blocking outbound path.

Fan-out calls `send(frame)` for every target socket without awaiting: the
frame bytes (built once per message per node) go straight to the transport's
write buffer. When that buffer passes `--max-outbound-bytes` the connection is
a slow consumer: it is closed with 1013 and nothing else waits for it
(the gorilla/centrifuge rule, in asyncio form).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from hubnode.errors import CloseCode
from hubnode.policy import ErrorStreak, TokenBucket

if TYPE_CHECKING:
    from aiohttp import web

    from hubnode.auth import Identity

__all__ = ["Connection"]

log = logging.getLogger(__name__)

# How long a close handshake may take before the socket is simply dropped; a
# slow consumer may never read its close frame.
CLOSE_TIMEOUT = 5.0

_closers: set[asyncio.Task[None]] = set()


class Connection:
    """A WebSocket client as the node sees it."""

    __slots__ = ("id", "identity", "user_id", "ws", "bucket", "streak", "closing", "slow",
                 "last_seen", "last_ping", "_transport", "_limit", "_closer")

    def __init__(self, conn_id: str, identity: Identity, ws: web.WebSocketResponse,
                 transport: asyncio.Transport, *, max_outbound: int,
                 bucket: TokenBucket, streak: ErrorStreak, now: float = 0.0) -> None:
        self.id = conn_id
        self.identity = identity
        self.user_id = identity.user_id
        self.ws = ws
        self.last_seen = now  # loop time of the last frame or pong from the client
        self.last_ping = now
        self._closer: asyncio.Task[None] | None = None
        self.bucket = bucket
        self.streak = streak
        self.closing = False
        self.slow = False
        self._transport = transport
        self._limit = max_outbound

    def send(self, frame: bytes) -> bool:
        """Queue a complete WebSocket frame; never blocks. False if not sent."""
        if self.closing:
            return False
        transport = self._transport
        if transport.is_closing():
            return False
        transport.write(frame)
        if transport.get_write_buffer_size() > self._limit:
            self.slow = True
            log.info("closing slow consumer %s: outbound buffer over %d bytes", self.id, self._limit)
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "slow consumer")
            return False
        return True

    def abort(self) -> None:
        """Drop a peer that stopped answering: no close handshake to wait for."""
        self.closing = True
        self._transport.abort()

    def close_soon(self, code: CloseCode, reason: str = "") -> None:
        """Start a close from any callback; later sends are dropped at once."""
        if self.closing:
            return
        self.closing = True
        task = self._closer = asyncio.get_running_loop().create_task(self.close(code, reason))
        _closers.add(task)
        task.add_done_callback(_closers.discard)

    async def wait_closed(self) -> None:
        """Let a close started by `close_soon` finish, so its code is the one sent."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def close(self, code: CloseCode, reason: str = "") -> None:
        """Close with `code`, dropping the socket if the handshake stalls."""
        self.closing = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError, RuntimeError):
            with contextlib.suppress(Exception):
                self._transport.abort()
