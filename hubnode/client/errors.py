"""The exceptions of hubnode.client: one tree under HubError, whose `code` says what happened.

The node's own error codes (hubnode.errors.ErrorCode values) arrive as
RequestFailed; the others are the client's: timeout, disconnected, closed,
left, refused, bad_frame, as hub.js names them.
"""

from __future__ import annotations

__all__ = ["BadServerFrame", "ClientClosed", "Disconnected", "HandshakeRefused", "HubError", "LeftRoom",
           "RequestFailed", "RequestTimeout"]


class HubError(Exception):
    """A request or the client failed; `code` says how (a protocol error code, or the client's own)."""

    code: str = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class RequestFailed(HubError):
    """The node answered the request with an `error` frame: `code` is its ErrorCode value."""


class RequestTimeout(HubError, TimeoutError):
    code = "timeout"


class Disconnected(HubError):
    """The connection dropped before the answer: the request may or may not have taken effect."""

    code = "disconnected"


class ClientClosed(HubError):
    """The client was closed (by `close()`, or by the server with close 4000)."""

    code = "closed"


class LeftRoom(HubError):
    """`leave(room)` was called while a join of that room waited for a connection."""

    code = "left"


class HandshakeRefused(HubError):
    """The node refused the WebSocket handshake (bad token, origin, limits): `status` is its HTTP status."""

    code = "refused"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BadServerFrame(HubError):
    """The server sent something that is not a hub frame: a broken node, or not a hub at all."""

    code = "bad_frame"
