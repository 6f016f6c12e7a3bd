"""`Publisher`: publish to the hub and inspect it from blocking code.

For Celery and RQ tasks, Django views, cron scripts: anything without an
event loop. It is a thin adapter: validation and packing live in
`publisher.core`, the inspection queries in `publisher.inspect`; this module
only runs them on a blocking redis-py client.

Order: the publisher owns exactly one connection (a blocking pool of size
one), so messages published one after another leave in that order, and a
subscriber sees them in that order. Threads may share one Publisher: they
take turns on the connection.

Delivery is at most once per envelope id. After a timeout nobody knows
whether the first try reached Redis, so by default nothing is resent and a
failed call raises `redis.ConnectionError` or `redis.TimeoutError` (the next
call reconnects). With `retries=N` the same payload, with the same envelope
id, is sent again up to N times: nodes drop an id they delivered within the
last 60 s, so a retry never delivers twice. Control commands
(`disconnect_user`, `join_user`, ...) are sent the same way, one PUBLISH to
exactly the nodes that hold the user or connection, and a node acts on an
envelope id once, so `retries` is safe for them too.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeVar

import redis

from publisher import core, history, inspect, redis_clients, topology
from publisher.control import Command
from publisher.core import DEFAULT_TIMEOUT, Item, MessageLike
from publisher.history import History, HistoryPolicy
from publisher.keys import Keys
from publisher.query import Query, Step, drive, run_step
from publisher.targets import Target

__all__ = ["Publisher"]

_CLUSTER = redis.RedisCluster

T = TypeVar("T")


class Publisher:
    """Publish messages to a hub's nodes through Redis, and read its state.

    `url` defaults to HUB_REDIS_URL, else redis://127.0.0.1:6379/0;
    `key_prefix` to HUB_KEY_PREFIX, else "hub:" (the nodes' `--key-prefix`);
    `origin_id` names this publisher in envelopes as "pub:<origin_id>"
    (unique to the process by default); `timeout` bounds every Redis command,
    in seconds; `retries` resends a publish that timed out or lost its
    connection, safely (nodes deduplicate by envelope id).
    `history_size`, `history_ttl`, `history_rooms`, `history_users` are the
    nodes' `--history-*` settings (default: HUB_HISTORY_*, else off): a
    publish to a stream they cover creates its history; a publish to a
    stream that already has history appends to it whatever they say.
    Pass `client=` to reuse a redis.Redis you own: the publisher then never
    closes it, and its timeouts and ordering are the client's.

    Use it as a context manager, or call `close()`.
    """

    def __init__(self, url: str | None = None, *, key_prefix: str | None = None,
                 origin_id: str | None = None, timeout: float = DEFAULT_TIMEOUT, retries: int = 0,
                 history_size: int | None = None, history_ttl: int | None = None,
                 history_rooms: str | None = None, history_users: bool | None = None,
                 redis_ca: str | None = None, redis_cert: str | None = None, redis_key: str | None = None,
                 client: redis.Redis | None = None) -> None:
        self.keys = Keys(core.default_prefix() if key_prefix is None else key_prefix)
        self._origin = core.Origin(origin_id)
        self.history_policy = HistoryPolicy.resolve(history_size, history_ttl, history_rooms, history_users)
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.retries = retries
        self._owns_client = client is None
        self._target = topology.publisher_target(url, redis_ca, redis_cert, redis_key)
        self._timeout = timeout
        self._client: Any = client
        self._sharded = client is not None and isinstance(client, _CLUSTER)
        self._closed = False

    @property
    def origin(self) -> str:
        """The envelope origin: "pub:<origin_id>", else one unique to this process."""
        return str(self._origin)

    # -- publishing ------------------------------------------------------------
    def broadcast_to_all(self, msg: MessageLike) -> int:
        """Send to every connection of the hub; returns how many nodes took it."""
        return self._publish(Target("all"), msg)

    def broadcast_to_room(self, room: str, msg: MessageLike) -> int:
        """Send to every member of `room`; returns how many nodes took it (0: no member)."""
        return self._publish(Target("room", room), msg)

    def broadcast_to_user(self, user_id: str, msg: MessageLike) -> int:
        """Send to every connection of user `user_id`; returns how many nodes took it."""
        return self._publish(Target("user", user_id), msg)

    def publish_many(self, items: Iterable[Item]) -> list[int]:
        """Publish (Target, message) pairs in order, pipelined; one node count per item.

        Every item is validated before the first is sent: a ValueError means
        nothing of the batch went out.
        """
        batch = core.prepare_many(items, self.origin, self.keys)
        if not batch:
            return []
        return self._run(core.publish_query(batch, self.keys, self.history_policy, sharded=self._is_sharded()))

    def _publish(self, target: Target, msg: MessageLike) -> int:
        outgoing = core.prepare(target, msg, self.origin, self.keys)
        return self._run(core.publish_query([outgoing], self.keys, self.history_policy,
                                           sharded=self._is_sharded()))[0]

    # -- server-side control (docs/protocol.md; see publisher.control) ----
    def disconnect_user(self, user_id: str, *, reason: str = "", reconnect: bool = False) -> int:
        """Close every open connection of `user_id`, cluster-wide; returns how many nodes took it (0: none holds one).

        The client sees a `disconnect` system message with `reason`, then
        close 4001 when `reconnect` (it may come back) or 4000 (it must not).
        Connections the user opens afterwards are not affected.
        """
        return self._control(Command("disconnect", user=user_id, reason=reason, reconnect=reconnect))

    def disconnect_connection(self, conn_id: str, *, reason: str = "", reconnect: bool = False) -> int:
        """Close the one connection `conn_id` ("<node>:<n>"); returns how many nodes took it.

        That is 1 while the node that owns it is up, whether or not the
        connection is still open there, and 0 when that node is gone.
        """
        return self._control(Command("disconnect", conn=conn_id, reason=reason, reconnect=reconnect))

    def join_user(self, user_id: str, room: str) -> int:
        """Join every open connection of `user_id` to `room`, server-side; returns how many nodes took it.

        The token's `rooms` claim does not apply (the server decided), the
        nodes' `--max-rooms-per-conn` does.
        """
        return self._control(Command("join", user=user_id, room=room))

    def leave_user(self, user_id: str, room: str) -> int:
        """Take every open connection of `user_id` out of `room`; returns how many nodes took it."""
        return self._control(Command("leave", user=user_id, room=room))

    def _control(self, command: Command) -> int:
        """Send a command validated by its constructor, to exactly the nodes that hold its user or connection."""
        return self._run(core.control_query(command, self.origin, self.keys, self._is_sharded()))

    # -- inspection (docs/redis.md keys; see publisher.inspect) --------
    def rooms(self) -> dict[str, int]:
        """Room -> member connections, cluster-wide (as GET /api/rooms)."""
        return self._run(inspect.rooms(self.keys))

    def room_members(self, room: str) -> list[inspect.Member]:
        """(conn_id, user_id or None, node) of each connection in `room` (as GET /api/rooms/<room>)."""
        return self._run(inspect.room_members(self.keys, room))

    def room_count(self) -> int:
        """How many rooms have members."""
        return self._run(inspect.room_count(self.keys))

    def client_count(self) -> int:
        """Connections on live nodes, cluster-wide."""
        return self._run(inspect.client_count(self.keys))

    def nodes(self) -> list[inspect.NodeInfo]:
        """Live nodes with their client counts and heartbeat age."""
        return self._run(inspect.live_nodes(self.keys))

    def stats(self) -> inspect.HubStats:
        """clients, rooms, nodes: the numbers of GET /api/stats."""
        return self._run(inspect.stats(self.keys))

    def user_online(self, user_id: str) -> int:
        """How many connections `user_id` has cluster-wide (0: offline)."""
        return self._run(inspect.user_online(self.keys, user_id))

    def presence(self, room: str) -> inspect.Presence:
        """Who is in `room`: users with their connection counts, and anonymous connections, read in one step.

        As GET /api/rooms/<room>/presence; ValueError for an invalid room name, before asking Redis.
        """
        return self._run(inspect.presence(self.keys, room))

    def history(self, room: str | None = None, *, user: str | None = None, since: int = 0,
                limit: int = 100) -> History:
        """A room's (or with `user=`, a user's) history: messages with offset above `since`, oldest first.

        As `GET /api/rooms/<room>/history`: `epoch` is None when the stream has no history.
        """
        kind, name = history.target_of_query(room, user)
        return self._run(history.history_query(self.keys, kind, name, since, history.check_limit(limit)))

    def _is_sharded(self) -> bool:
        """True on a Redis Cluster: publishes go out with SPUBLISH (asks Redis once, on first use)."""
        self._connection()
        return self._sharded

    def _connection(self) -> Any:
        """The client, made on first use: a `redis://` URL may name a Redis Cluster, which only Redis can tell.

        The servers are asked what they are first (`redis_clients.probe`): a
        topology that is wrong raises TopologyError (a ValueError); one that
        cannot be reached raises redis.ConnectionError, and the next call asks again.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._client is None:
            try:
                target = redis_clients.probe(self._target, self._timeout)
            except TimeoutError as exc:  # asked again on the next call
                raise redis.TimeoutError(str(exc)) from None
            except ConnectionError as exc:
                raise redis.ConnectionError(str(exc)) from None
            self._client = redis_clients.sync_client(target, timeout=self._timeout, max_connections=1)
            self._sharded = target.sharded
        return self._client

    # -- the I/O: the only part that differs from AsyncPublisher ---------------
    def _run(self, query: Query[T]) -> T:
        return drive(query, self._execute)

    def _execute(self, step: Step) -> Any:
        """Run one step; with `retries`, resend the same bytes after a lost or timed-out call.

        Resending is safe because the payload (and so its envelope id) is the
        same: a node drops an id it has already delivered.
        """
        for attempt in range(self.retries + 1):
            try:
                return run_step(self._connection(), step)
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection (unless the client was passed in). Idempotent."""
        client, self._client, self._closed = self._client, None, True
        if self._owns_client and client is not None:
            client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} origin={self.origin!r} prefix={self.keys.prefix!r}>"
