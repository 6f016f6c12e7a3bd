"""`AsyncPublisher`: `Publisher` for asyncio code (aiohttp, FastAPI, arq workers).

The same methods as `Publisher`, awaited, over the same pure functions
(`publisher.core`, `publisher.inspect`); only the driver differs.

Order: one connection, and an asyncio.Lock around each round trip. The lock
is fair (first come, first served) and a waiting task cannot be overtaken
by a newcomer, so messages leave in the order the publish calls were made,
even from concurrent tasks. Use one AsyncPublisher within one event loop.

Delivery is at most once per envelope id: nothing is resent unless
`retries` is set (see `publisher.sync`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from publisher import core, history, inspect, redis_clients, topology
from publisher.control import Command
from publisher.core import DEFAULT_TIMEOUT, Item, MessageLike
from publisher.history import History, HistoryPolicy
from publisher.keys import Keys
from publisher.query import Query, Step, drive_async, run_step
from publisher.targets import Target

__all__ = ["AsyncPublisher"]

_CLUSTER = aioredis.RedisCluster

T = TypeVar("T")


class AsyncPublisher:
    """Publish messages to a hub's nodes through Redis, and read its state, with asyncio.

    Arguments as for `Publisher`; `client=` takes a redis.asyncio.Redis
    that stays yours. Use `async with`, or `await close()`.
    """

    def __init__(self, url: str | None = None, *, key_prefix: str | None = None,
                 origin_id: str | None = None, timeout: float = DEFAULT_TIMEOUT, retries: int = 0,
                 history_size: int | None = None, history_ttl: int | None = None,
                 history_rooms: str | None = None, history_users: bool | None = None,
                 redis_ca: str | None = None, redis_cert: str | None = None, redis_key: str | None = None,
                 client: aioredis.Redis | None = None) -> None:
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
        self._turn = asyncio.Lock()
        self._opening = asyncio.Lock()  # one client, however many first calls race

    @property
    def origin(self) -> str:
        """The envelope origin: "pub:<origin_id>", else one unique to this process."""
        return str(self._origin)

    # -- publishing ------------------------------------------------------------
    async def broadcast_to_all(self, msg: MessageLike) -> int:
        """Send to every connection of the hub; returns how many nodes took it."""
        return await self._publish(Target("all"), msg)

    async def broadcast_to_room(self, room: str, msg: MessageLike) -> int:
        """Send to every member of `room`; returns how many nodes took it (0: no member)."""
        return await self._publish(Target("room", room), msg)

    async def broadcast_to_user(self, user_id: str, msg: MessageLike) -> int:
        """Send to every connection of user `user_id`; returns how many nodes took it."""
        return await self._publish(Target("user", user_id), msg)

    async def publish_many(self, items: Iterable[Item]) -> list[int]:
        """Publish (Target, message) pairs in order, pipelined; one node count per item.

        Every item is validated before the first is sent.
        """
        batch = core.prepare_many(items, self.origin, self.keys)
        if not batch:
            return []
        sharded = await self._is_sharded()
        return await self._run(core.publish_query(batch, self.keys, self.history_policy, sharded=sharded))

    async def _publish(self, target: Target, msg: MessageLike) -> int:
        outgoing = core.prepare(target, msg, self.origin, self.keys)
        return (await self._run(core.publish_query([outgoing], self.keys, self.history_policy,
                                           sharded=await self._is_sharded())))[0]

    # -- server-side control: as Publisher's (docs/protocol.md; publisher.control) --
    async def disconnect_user(self, user_id: str, *, reason: str = "", reconnect: bool = False) -> int:
        """Close every open connection of `user_id`, cluster-wide; returns how many nodes took it (0: none holds one).

        Close 4001 when `reconnect`, else 4000; `reason` goes in the system message the client sees first.
        """
        return await self._control(Command("disconnect", user=user_id, reason=reason, reconnect=reconnect))

    async def disconnect_connection(self, conn_id: str, *, reason: str = "", reconnect: bool = False) -> int:
        """Close the one connection `conn_id` ("<node>:<n>"); returns how many nodes took it.

        That is 1 while the node that owns it is up, whether or not the
        connection is still open there, and 0 when that node is gone.
        """
        return await self._control(Command("disconnect", conn=conn_id, reason=reason, reconnect=reconnect))

    async def join_user(self, user_id: str, room: str) -> int:
        """Join every open connection of `user_id` to `room`, server-side; returns how many nodes took it."""
        return await self._control(Command("join", user=user_id, room=room))

    async def leave_user(self, user_id: str, room: str) -> int:
        """Take every open connection of `user_id` out of `room`; returns how many nodes took it."""
        return await self._control(Command("leave", user=user_id, room=room))

    async def _control(self, command: Command) -> int:
        sharded = await self._is_sharded()
        return await self._run(core.control_query(command, self.origin, self.keys, sharded))

    # -- inspection: as Publisher's (docs/redis.md; publisher.inspect) --
    async def rooms(self) -> dict[str, int]:
        return await self._run(inspect.rooms(self.keys))

    async def room_members(self, room: str) -> list[inspect.Member]:
        return await self._run(inspect.room_members(self.keys, room))

    async def room_count(self) -> int:
        return await self._run(inspect.room_count(self.keys))

    async def client_count(self) -> int:
        return await self._run(inspect.client_count(self.keys))

    async def nodes(self) -> list[inspect.NodeInfo]:
        return await self._run(inspect.live_nodes(self.keys))

    async def stats(self) -> inspect.HubStats:
        return await self._run(inspect.stats(self.keys))

    async def user_online(self, user_id: str) -> int:
        return await self._run(inspect.user_online(self.keys, user_id))

    async def presence(self, room: str) -> inspect.Presence:
        """Who is in `room` (as GET /api/rooms/<room>/presence); ValueError for an invalid name."""
        return await self._run(inspect.presence(self.keys, room))

    async def history(self, room: str | None = None, *, user: str | None = None, since: int = 0,
                      limit: int = 100) -> History:
        kind, name = history.target_of_query(room, user)
        return await self._run(history.history_query(self.keys, kind, name, since, history.check_limit(limit)))

    async def _is_sharded(self) -> bool:
        """True on a Redis Cluster: publishes go out with SPUBLISH (asks Redis once, on first use)."""
        await self._connection()
        return self._sharded

    async def _connection(self) -> Any:
        """The client, made on first use: a `redis://` URL may name a Redis Cluster, which only Redis can tell.

        The servers are asked what they are first (`redis_clients.probe`): a
        topology that is wrong raises TopologyError (a ValueError); one that
        cannot be reached raises redis.ConnectionError, and the next call asks again.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._client is not None:
            return self._client
        async with self._opening:
            if self._client is None:
                try:
                    target = await asyncio.to_thread(redis_clients.probe, self._target, self._timeout)
                except TimeoutError as exc:  # asked again on the next call
                    raise redis.TimeoutError(str(exc)) from None
                except ConnectionError as exc:
                    raise redis.ConnectionError(str(exc)) from None
                self._client = redis_clients.async_client(target, timeout=self._timeout, max_connections=1)
                self._sharded = target.sharded
        return self._client

    # -- the I/O: the only part that differs from Publisher --------------------
    async def _run(self, query: Query[T]) -> T:
        return await drive_async(query, self._execute)

    async def _execute(self, step: Step) -> Any:
        """As Publisher._execute: `retries` resends the same bytes, which nodes deduplicate."""
        async with self._turn:
            for attempt in range(self.retries + 1):
                try:
                    return await run_step(await self._connection(), step)
                except (redis.ConnectionError, redis.TimeoutError):
                    if attempt == self.retries:
                        raise
            raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the connection (unless the client was passed in). Idempotent."""
        client, self._client, self._closed = self._client, None, True
        if self._owns_client and client is not None:
            await client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} origin={self.origin!r} prefix={self.keys.prefix!r}>"
