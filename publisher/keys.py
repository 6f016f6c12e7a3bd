"""Every Redis channel and key name of docs/redis.md, built in one place.

Room, user and node names are wrapped in `{}` (Redis Cluster hash tags): a
room's channel and keys share one slot, as do a user's and a node's keys, so
every script touches one slot, on a single Redis and on a Redis Cluster alike.
The node channel is tagged too (`hub:node:{<id>}`), like the node's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "Keys", "check_prefix"]

DEFAULT_PREFIX = "hub:"


def check_prefix(prefix: object) -> str | None:
    """What is wrong with a key prefix, or None.

    It starts every key and channel: whitespace would break redis-cli lines,
    and braces would become a Redis Cluster hash tag and move keys to other slots.
    """
    if not (isinstance(prefix, str) and 1 <= len(prefix) <= 64
            and not any(c.isspace() or not c.isprintable() or c in "{}" for c in prefix)):
        return "expected 1-64 printable characters without whitespace, '{' or '}' (default 'hub:')"
    return None


@dataclass(frozen=True, slots=True)
class Keys:
    """Channel and key names under one `--key-prefix`."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        problem = check_prefix(self.prefix)
        if problem:
            raise ValueError(f"key prefix {self.prefix!r}: {problem}")

    # -- pub/sub channels -------------------------------------------------
    @property
    def all(self) -> str:
        return f"{self.prefix}all"

    def node_channel(self, node_id: str) -> str:
        """The node's own channel (control and liveness probe), in the slot of its keys.

        On a Redis Cluster the node's subscriber connection to that shard
        carries it, so a failover of the shard that holds the node's keys is
        noticed like any other subscriber loss (and the node rewrites them).
        """
        return f"{self.prefix}node:{{{node_id}}}"

    def room_channel(self, room: str) -> str:
        return f"{self.prefix}room:{{{room}}}"

    def user_channel(self, user_id: str) -> str:
        return f"{self.prefix}user:{{{user_id}}}"

    def parse_channel(self, channel: str) -> tuple[str, str] | None:
        """('all'|'room'|'user'|'node', name) for one of our channels, else None."""
        if not channel.startswith(self.prefix):
            return None
        rest = channel[len(self.prefix):]
        if rest == "all":
            return ("all", "")
        kind, sep, name = rest.partition(":")
        if not sep:
            return None
        if kind in ("room", "user") and name.startswith("{") and name.endswith("}"):
            return (kind, name[1:-1])
        if kind == "node" and name.startswith("{") and name.endswith("}"):
            return ("node", name[1:-1])
        return None

    # -- membership keys (docs/redis.md) ---------------------------------
    # Every Lua script and MULTI touches keys of one Redis Cluster hash slot: a
    # node's keys share the slot of `{<node id>}`, a room's the slot of
    # `{<room>}`, a user's the slot of `{<user id>}`. The registry index
    # `nodes` has a slot of its own and is only written by commands of its own.
    def members(self, room: str) -> str:
        """The room's members (HASH conn_id -> user_id, "" for anonymous)."""
        return f"{self.prefix}members:{{{room}}}"

    def presence(self, room: str) -> str:
        """The room's users (HASH user_id -> their connections in the room), kept with its members hash.

        The step that writes a member also counts it here, so it knows a
        user's first and last connection in the room (docs/protocol.md);
        anonymous connections are the members hash's HLEN minus the sum.
        """
        return f"{self.prefix}presence:{{{room}}}"

    def online(self, user_id: str) -> str:
        """The user's connections cluster-wide (HASH conn_id -> node id): HLEN is the online count."""
        return f"{self.prefix}online:{{{user_id}}}"

    @property
    def nodes(self) -> str:
        """The registry index (ZSET node id -> expiry ms; 0: claimed by a sweep)."""
        return f"{self.prefix}nodes"

    def node(self, node_id: str) -> str:
        """The node's HASH: clients, started_at, heartbeat_at, heartbeat_interval, address, version, expiry."""
        return f"{self.prefix}node:{{{node_id}}}"

    def node_rooms(self, node_id: str) -> str:
        """Rooms in which the node may have members (SET; a superset, for listings and sweeps)."""
        return f"{self.prefix}node:{{{node_id}}}:rooms"

    def node_users(self, node_id: str) -> str:
        """User -> the node's connections of that user (HASH; for sweeps)."""
        return f"{self.prefix}node:{{{node_id}}}:users"

    def node_conns(self, node_id: str) -> str:
        """The node's connection ids (SET): makes connect/disconnect updates idempotent."""
        return f"{self.prefix}node:{{{node_id}}}:conns"

    # -- stream history (docs/protocol.md) -----------------------------
    def stream(self, kind: str, name: str) -> str:
        """A room's or user's history (STREAM; entry id `<offset>-1`, field `p` = the envelope as published).

        `kind` is "room" or "user"; the name is the hash tag, so the stream,
        its meta and its channel share one Redis Cluster slot.
        """
        return f"{self.prefix}stream:{kind}:{{{name}}}"

    def stream_meta(self, kind: str, name: str) -> str:
        """The stream's position (HASH: `epoch`, `offset`, `size`, `ttl`)."""
        return f"{self.prefix}stream:{kind}:{{{name}}}:meta"

    def stream_ids(self, kind: str, name: str) -> str:
        """The envelope ids of the messages the stream keeps (ZSET, id -> offset): a retry is stored once."""
        return f"{self.prefix}stream:{kind}:{{{name}}}:ids"

    # -- the cluster dashboard ------------------------------------------------
    def node_metrics(self, node_id: str) -> str:
        """The node's metrics snapshot (STRING, JSON), rewritten every heartbeat and expiring 3 heartbeats later.

        Any node serves the cluster dashboard from these, so the page shows
        every node's numbers whichever node a load balancer picked.
        """
        return f"{self.prefix}node:{{{node_id}}}:metrics"
