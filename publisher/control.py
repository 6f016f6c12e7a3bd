"""Server-side control commands (docs/protocol.md): what they are and how they travel.

Pure: no I/O. A command acts on every open connection of a user, or on one
connection, wherever it is. It travels as an envelope on the channel of what
it acts on, so only the nodes that hold it receive it (never every node):

- a user's commands on `hub:user:{<user>}`, the channel a node subscribes
  while it has a connection of that user;
- one connection's on `hub:node:{<node>}`, the channel of the node that
  owns it (a connection id is `<node>:<n>`).

PUBLISH (SPUBLISH on a Redis Cluster) answers how many nodes took it, which
is what every control call returns. The envelope is
`{"v": 1, "id": str, "origin": str, "ctl": {"op": ..., ...}}`: `ctl`
instead of `msg`, so a node never mistakes a command for a message to
deliver, and `id` makes a retry safe (a node acts on an id once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from publisher.envelope import VERSION, new_message_id
from publisher.keys import Keys
from publisher.message import MessageError
from publisher.names import check_name

__all__ = ["MAX_REASON", "OPS", "Command", "command_of", "pack_command", "parse_conn_id"]

Op = Literal["disconnect", "join", "leave"]
OPS: tuple[str, ...] = ("disconnect", "join", "leave")

MAX_REASON = 256
"""Characters of a disconnect reason (the close frame carries its first 123 bytes)."""


def parse_conn_id(conn_id: Any) -> str:
    """The node that owns `conn_id` ("<node>:<n>"); MessageError for anything else."""
    if not isinstance(conn_id, str) or check_name(conn_id) is not None:
        raise MessageError("connection id must be '<node>:<n>', as the connected frame gives it")
    node, sep, serial = conn_id.rpartition(":")
    if not sep or not node or not serial.isascii() or not serial.isdigit() or check_name(node) is not None:
        raise MessageError("connection id must be '<node>:<n>', as the connected frame gives it")
    return node


@dataclass(frozen=True, slots=True)
class Command:
    """One control command: `op` on the connections of `user`, or on the one connection `conn`.

    disconnect: `reason` (shown to the client) and `reconnect` (close 4001
    instead of 4000). join / leave: `room`. Exactly one of `user` and `conn`.
    """

    op: Op
    user: str | None = None
    conn: str | None = None
    room: str | None = None
    reason: str = ""
    reconnect: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MessageError(f"unknown control operation {self.op!r} (expected one of {', '.join(OPS)})")
        if (self.user is None) == (self.conn is None):
            raise MessageError("a control command names a user or one connection, not both or neither")
        if self.user is not None:
            problem = check_name(self.user)
            if problem:
                raise MessageError(f"user id {problem}")
        if self.conn is not None:
            parse_conn_id(self.conn)
        if self.op == "disconnect":
            if self.room is not None:
                raise MessageError("disconnect takes no room")
            if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
                raise MessageError(f"reason must be a string of at most {MAX_REASON} characters")
            if not isinstance(self.reconnect, bool):
                raise MessageError("reconnect must be true or false")
        else:
            if self.reason != "" or self.reconnect is not False:
                raise MessageError(f"{self.op} takes no reason or reconnect (only disconnect does)")
            problem = check_name(self.room)
            if problem:
                raise MessageError(f"room name {problem}")
            if self.conn is not None:
                raise MessageError(f"{self.op} acts on a user's connections: name a user")

    def channel(self, keys: Keys) -> str:
        """The channel that reaches exactly the nodes holding what the command acts on."""
        if self.user is not None:
            return keys.user_channel(self.user)
        return keys.node_channel(parse_conn_id(self.conn))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        if self.user is not None:
            out["user"] = self.user
        if self.conn is not None:
            out["conn"] = self.conn
        if self.room is not None:
            out["room"] = self.room
        if self.op == "disconnect":
            out["reason"] = self.reason
            out["reconnect"] = self.reconnect
        return out


def command_of(raw: Any) -> Command:
    """The Command of an envelope's `ctl` map; MessageError when it is malformed."""
    if not isinstance(raw, dict):
        raise MessageError("'ctl' must be a map")
    reason = raw.get("reason", "")
    reconnect = raw.get("reconnect", False)
    return Command(op=raw.get("op"), user=raw.get("user"), conn=raw.get("conn"), room=raw.get("room"),  # type: ignore[arg-type]
                   reason=reason, reconnect=reconnect)


def pack_command(command: Command, origin: str, envelope_id: str | None = None) -> tuple[str, bytes]:
    """(envelope id, payload) of a command, ready for PUBLISH (or SPUBLISH) on `command.channel(keys)`."""
    mid = envelope_id or new_message_id()
    payload = msgpack.packb({"v": VERSION, "id": mid, "origin": origin, "ctl": command.to_wire(),
                             "ts": time.time()}, use_bin_type=True)
    return mid, payload
