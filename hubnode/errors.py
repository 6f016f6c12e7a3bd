"""Error codes sent to clients and WebSocket close codes (docs/protocol.md).

Protocol errors are values sent to the client, not exceptions escaping the
reader loop; each member says whether a client should reconnect after it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["JOIN_ERRORS", "CloseCode", "ErrorCode"]


class ErrorCode(StrEnum):
    """The `data.code` of an `error` frame. None of them closes the connection."""

    BAD_JSON = "bad_json"  # frame is not JSON or not an object
    BAD_MESSAGE = "bad_message"  # type missing, or data of the wrong shape
    UNKNOWN_TYPE = "unknown_type"  # a type the server does not know
    BAD_ROOM = "bad_room"  # room name breaks the naming rules
    NOT_IN_ROOM = "not_in_room"  # room_message to a room not joined
    FORBIDDEN = "forbidden"  # auth or policy forbids it
    TOO_MANY_ROOMS = "too_many_rooms"  # --max-rooms-per-conn reached
    RATE_LIMITED = "rate_limited"  # token bucket empty: the frame had no effect
    UNAVAILABLE = "unavailable"  # broker unreachable: nothing was published


class CloseCode(IntEnum):
    """WebSocket close codes the node sends, with the reconnect advice."""

    NORMAL = 1000  # done; reconnect only if the app wants to
    GOING_AWAY = 1001  # node draining: reconnect at once, elsewhere
    UNSUPPORTED_DATA = 1003  # binary frame: a client bug, do not retry blindly
    POLICY = 1008  # too many errors or token expired: fix, then reconnect
    TOO_BIG = 1009  # frame over --max-message-bytes: a client bug
    TRY_AGAIN_LATER = 1013  # slow consumer: reconnect with backoff
    DISCONNECTED = 4000  # disconnected by the server (docs/protocol.md, server-side control): do not reconnect
    DISCONNECTED_RECONNECT = 4001  # disconnected by the server, may reconnect (e.g. to another node)


JOIN_ERRORS = {
    ErrorCode.TOO_MANY_ROOMS: "room limit per connection reached",
    ErrorCode.UNAVAILABLE: "broker unreachable: not joined",
}
"""Why a join was refused: a client's join_room and a server-side join say the same."""
