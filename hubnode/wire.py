"""Names on the wire that the node and its clients share: frame types, system events, the subprotocol.

Standard library only, so `hubnode.client` can import it (and `hubnode.errors`)
without the node's dependencies; the node builds its frames from the same
names, so a client cannot drift from the server by a typo.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MSGPACK_PROTOCOL", "ClientType", "PresenceEvent", "ServerType", "SystemEvent"]

# The WebSocket subprotocol of binary msgpack frames (the default is JSON text).
MSGPACK_PROTOCOL = "hubnode.msgpack"


class ClientType(StrEnum):
    """The `type` of a frame a client sends."""

    JOIN_ROOM = "join_room"
    LEAVE_ROOM = "leave_room"
    BROADCAST = "broadcast"
    ROOM_MESSAGE = "room_message"
    PRIVATE_MESSAGE = "private_message"
    PING = "ping"
    PRESENCE = "presence"


class ServerType(StrEnum):
    """The `type` of the frames the node itself makes (published messages carry any other type too)."""

    CONNECTED = "connected"
    ACK = "ack"
    ERROR = "error"
    PONG = "pong"
    PRESENCE = "presence"  # the answer to a presence query (with `id`), or a join/leave event (without)
    ROOM_MESSAGE = "room_message"
    PRIVATE_MESSAGE = "private_message"
    BROADCAST = "broadcast"
    SYSTEM_MESSAGE = "system_message"


class SystemEvent(StrEnum):
    """`data.event` of a `system_message`."""

    RECONNECT = "reconnect"  # the node is draining: reconnect now, elsewhere
    RESYNC = "resync"  # the node lost Redis for a while: messages may be missing
    DISCONNECT = "disconnect"  # a server-side disconnect; close 4000 or 4001 follows
    JOINED = "joined"  # the server joined this connection to data.room
    LEFT = "left"  # the server took this connection out of data.room


class PresenceEvent(StrEnum):
    """`data.event` of a presence event."""

    JOIN = "join"
    LEAVE = "leave"
