"""Membership in Redis, readable with redis-cli (PROTOCOL.md section 7).

Every change is one Lua script, so the room hash, the room counts, the online
counts and the node's own clean-up index move together. One writer task sends
a node's changes in the order the node made them, batched into a pipeline
per round trip: a re-registration's snapshot, taken when it is queued, sits in
that order too, so no change can land on the wrong side of it, and a
connection storm costs round trips per batch, not per change. Connect and
disconnect are also idempotent (the node's conns set decides whether counts
move). An update that fails (timeout, Redis restart) is never silently lost: it
is counted and the node re-registers its whole local state on the next
heartbeat, which rebuilds its entries exactly. A script that finds the node
unregistered (swept while paused, or Redis lost its data) does the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hubnode.membership.base import Member, SnapshotSource, Stats
from publisher import inspect
from publisher.keys import Keys
from publisher.query import Query, drive_async, run_step, text

T = TypeVar("T")

__all__ = ["RedisClusterUnsupported", "RedisMembershipStore"]

log = logging.getLogger(__name__)

_SCRIPTS = ("connect", "disconnect", "join", "leave", "heartbeat", "register", "sweep", "unregister")


def _load_scripts() -> dict[str, str]:
    folder = resources.files("hubnode.membership") / "lua"
    common = (folder / "common.lua").read_text()
    return {name: common + "\n" + (folder / f"{name}.lua").read_text() for name in _SCRIPTS}


class RedisMembershipStore:
    """A MembershipStore on one Redis (or Sentinel-managed primary)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, node_id: str, *, heartbeat: float = 2.0,
                 address: str = "", version: str = "") -> None:
        self.redis = client
        self.keys = keys
        self.node_id = node_id
        self.heartbeat_interval = heartbeat
        self.address = address
        self.version = version
        self.started_at = int(time.time())
        self.failed_updates = 0
        self.registrations = 0
        self.swept_nodes = 0
        self._dirty = True  # not registered yet
        self._snapshot: SnapshotSource = lambda: ()
        self._scripts = {name: client.register_script(src) for name, src in _load_scripts().items()}
        self._queue: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        k = keys
        self._node_key = k.node(node_id)
        self._node_keys = [k.nodes, self._node_key, k.node_users(node_id), k.online]
        self._conns_key = k.node_conns(node_id)

    # -- life cycle ------------------------------------------------------------
    async def start(self, snapshot: SnapshotSource) -> None:
        self._snapshot = snapshot
        await self._refuse_cluster()
        await self._warn_on_eviction()
        self._writer = asyncio.create_task(self._write_loop(), name="hubnode-membership-writer")
        if not await self._register():
            log.warning("could not register node in Redis; retrying on each heartbeat")

    async def close(self) -> None:
        """Remove this node's entries without waiting for a sweep (drain)."""
        try:
            self._dirty = False  # queue the unregister behind every change already made
            await self._write("unregister", [], [])
        finally:
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.wait([self._writer], timeout=1.0)
            await self.redis.aclose()

    async def heartbeat(self) -> None:
        """Renew liveness; re-register when swept or after a failed update; sweep the dead."""
        now = _now_ms()
        if self._dirty:
            await self._register()
        elif await self._run("heartbeat", [self.keys.nodes, self._node_key],
                             [self._expiry(now), now]) in (0, None):
            log.warning("node %s found its registry entry gone (swept or Redis data lost): "
                        "re-registering", self.node_id)
            await self._register()
        await self.sweep(now)

    async def sweep(self, now: int | None = None) -> list[str]:
        """Remove every node whose heartbeat expired; returns those this call swept."""
        now = _now_ms() if now is None else now
        dead = await self.redis.zrangebyscore(self.keys.nodes, "-inf", now)
        swept = []
        for raw in dead:
            node = text(raw)
            if node != self.node_id and await self._run("sweep", [self.keys.nodes], [node, now]) == 1:
                swept.append(node)
                log.warning("swept dead node %s", node)
        self.swept_nodes += len(swept)
        return swept

    # -- updates -----------------------------------------------------------------
    async def add_connection(self, conn_id: str, user_id: str | None) -> None:
        await self._update("connect", [*self._node_keys, self._conns_key], [conn_id, user_id or ""])

    async def remove_connection(self, conn_id: str, user_id: str | None, rooms: Sequence[str],
                                emptied: Collection[str] = ()) -> None:
        k = self.keys
        keys = [*self._node_keys, k.node_rooms(self.node_id), self._conns_key, *(k.members(r) for r in rooms)]
        flags = ["1" if r in emptied else "0" for r in rooms]
        await self._update("disconnect", keys, [conn_id, user_id or "", len(rooms), *rooms, *flags])

    async def add_member(self, room: str, conn_id: str, user_id: str | None) -> None:
        await self._update("join", self._room_keys(room), [room, conn_id, user_id or ""])

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        await self._update("leave", self._room_keys(room), [room, conn_id, "1" if emptied else "0"])

    # -- reads -------------------------------------------------------------------
    # Reads are publisher.inspect's queries, so the HTTP API and hubctl give one answer.
    async def rooms(self) -> dict[str, int]:
        return await self._query(inspect.rooms(self.keys))

    async def members(self, room: str) -> list[Member]:
        return await self._query(inspect.room_members(self.keys, room))

    async def stats(self) -> Stats:
        return await self._query(inspect.stats(self.keys))

    async def online(self, user_id: str) -> int:
        return await self._query(inspect.user_online(self.keys, user_id))

    async def _query(self, query: Query[T]) -> T:
        return await drive_async(query, partial(run_step, self.redis))

    # -- internals ---------------------------------------------------------------
    def _room_keys(self, room: str) -> list[str]:
        k = self.keys
        return [k.nodes, k.members(room), k.rooms, k.node_rooms(self.node_id), self._conns_key]

    def _expiry(self, now: int) -> int:
        return now + int(3 * self.heartbeat_interval * 1000)

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=[self.keys.prefix, self.node_id, *args])

    async def _update(self, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue one change; on failure it is counted and reconciled on the next heartbeat."""
        if self._dirty:
            return  # the coming re-registration reads the table, this change included
        await self._write(name, keys, args)

    async def _write(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Queue a script behind every change made before it; its result (None if it failed)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((name, keys, [self.keys.prefix, self.node_id, *args], future))
        self._wake.set()
        return await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)

    async def _send(self, batch: list[tuple[str, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        """One pipeline per batch, in queue order; failures mark the store for reconciliation."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, keys, args, _ in batch:
                    await self._scripts[name](keys=keys, args=args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            results = [exc] * len(batch)
        for (name, _keys, _args, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                self.failed_updates += 1
                self._dirty = True
                log.warning("membership update %s failed (%s): reconciling on next heartbeat", name, result)
                result = None
            elif result == -1:
                self._dirty = True
            if not future.done():
                future.set_result(result)

    async def _register(self) -> bool:
        """Queue a full re-registration from the table as it is now; True if it went through."""
        snapshot = [[conn, user or "", sorted(rooms)] for conn, user, rooms in self._snapshot()]
        info = {"started_at": self.started_at, "address": self.address, "version": self.version,
                "heartbeat_at": _now_ms(), "heartbeat_interval": self.heartbeat_interval}
        self._dirty = False
        result = await self._write("register", [self.keys.nodes, self._node_key],
                                   [self._expiry(_now_ms()), orjson.dumps(info), orjson.dumps(snapshot)])
        if result is None:
            self._dirty = True
            return False
        self.registrations += 1
        return True

    async def _refuse_cluster(self) -> None:
        """A Redis Cluster node would take our multi-key scripts and fail them later: refuse now."""
        try:
            info = await self.redis.info("cluster")
        except RedisError:
            return  # unreachable now: the heartbeat registers once it is back
        if str(info.get("cluster_enabled", "0")) == "1":
            raise RedisClusterUnsupported(
                "the Redis at --redis-url runs in cluster mode, which hubnode does not support yet: "
                "use a single Redis primary (or one managed by Sentinel)")

    async def _warn_on_eviction(self) -> None:
        try:
            policy = (await self.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except RedisError:
            return  # CONFIG may be disabled on managed Redis
        if policy and text(policy) != "noeviction":
            log.warning("Redis maxmemory-policy is %r: membership keys may be evicted; "
                        "set it to 'noeviction'", text(policy))


class RedisClusterUnsupported(RuntimeError):
    """--redis-url points at a Redis Cluster node."""


def _now_ms() -> int:
    return int(time.time() * 1000)
