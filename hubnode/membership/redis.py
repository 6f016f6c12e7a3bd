"""Membership in Redis, readable with redis-cli (PROTOCOL.md section 7).

Every change is one Lua script, so the room hash, the room counts, the online
counts and the node's own clean-up index move together. Every key a script
touches is passed in KEYS, built by `publisher.keys.Keys`: no script builds a
key name, so there is one source of truth for names (and Redis Cluster can
route every script).

One writer task sends a node's changes in the order the node made them,
batched into a pipeline per round trip: a re-registration's snapshot, taken
when it is queued, sits in that order too, so no change can land on the wrong
side of it, and a connection storm costs round trips per batch, not per
change. Connect and disconnect are also idempotent (the node's conns set
decides whether counts move). An update that fails (timeout, Redis restart)
is never silently lost: it is counted and the node re-registers its whole
local state on the next heartbeat, which rebuilds its entries exactly. A
script that finds the node unregistered (swept while paused, or Redis lost
its data) does the same.

Work proportional to a node's size (sweeping a dead node, draining,
re-registering) is done in bounded steps: each script handles one room's
next few hundred members, or a few hundred connections, so no single script
stalls Redis for the whole cluster, however large the rooms. Each removal
step re-checks that a swept node is still dead, so a node that comes back
mid-sweep stops the sweep at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hubnode.membership.base import Member, NodeInfo, SnapshotSource, Stats, StoreCounters
from hubnode.supervisor import Supervisor
from publisher import inspect
from publisher.keys import Keys
from publisher.query import Query, drive_async, run_step, text

T = TypeVar("T")

__all__ = ["RedisClusterUnsupported", "RedisMembershipStore"]

log = logging.getLogger(__name__)

_SCRIPTS = ("connect", "disconnect", "join", "leave", "heartbeat", "purge_room", "purge_users", "purge_conns",
            "purge_end",
            "register_begin", "register_conns", "register_room", "register_end")

STEP = 200
"""Members (or connections) one bounded script handles: about a millisecond of Redis time at most."""

REGISTER_STEP = 100
"""Connections or members one re-registration script adds (decoding JSON costs more than deleting)."""

ROOMS_PER_ROUND = 64
"""Rooms whose purge steps share one pipeline round trip."""

REFUSED = -2  # connect.lua: the user is at --max-connections-per-user


def _load_scripts() -> dict[str, str]:
    folder = resources.files("hubnode.membership") / "lua"
    common = (folder / "common.lua").read_text()
    return {name: common + "\n" + (folder / f"{name}.lua").read_text() for name in _SCRIPTS}


Job = Callable[[], Awaitable[Any]]


@dataclass(slots=True)
class _Write:
    """One queued write: a script call, or a multi-step job that runs alone, in order."""

    future: asyncio.Future[Any]
    name: str = ""
    keys: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    job: Job | None = None


class RedisMembershipStore:
    """A MembershipStore on one Redis (or Sentinel-managed primary)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, node_id: str, *, heartbeat: float = 2.0,
                 address: str = "", version: str = "", timeout: float = 5.0) -> None:
        self.redis = client
        self.keys = keys
        self.node_id = node_id
        self.heartbeat_interval = heartbeat
        self.address = address
        self.version = version
        self.timeout = timeout
        self.started_at = int(time.time())
        self.failed_updates = 0
        self.registrations = 0
        self.swept_nodes = 0
        self._dirty = True  # not registered yet
        self._registered = False  # the node's entry is known to be in Redis (readiness)
        self._snapshot: SnapshotSource = lambda: ()
        self._scripts = {name: client.register_script(src) for name, src in _load_scripts().items()}
        self._queue: list[_Write] = []
        self._wake = asyncio.Event()
        self._tasks = Supervisor()

    @property
    def ready(self) -> bool:
        return self._registered

    @property
    def counters(self) -> StoreCounters:
        return StoreCounters(failed_updates=self.failed_updates, swept_nodes=self.swept_nodes,
                             registrations=self.registrations)

    # -- life cycle ------------------------------------------------------------
    async def start(self, snapshot: SnapshotSource, supervisor: Supervisor | None = None) -> None:
        self._snapshot = snapshot
        if supervisor is not None:
            self._tasks = supervisor
        await self._refuse_cluster()
        await self._warn_on_eviction()
        self._tasks.spawn("membership-writer", self._write_loop)
        if not await self._register():
            log.warning("could not register node in Redis; retrying on each heartbeat")

    async def close(self) -> None:
        """Remove this node's entries without waiting for a sweep (drain), then disconnect."""
        try:
            self._dirty = False  # queue the unregister behind every change already made
            # the snapshot is no membership: deleting it need not wait in the writer's queue
            await asyncio.gather(self._forget_metrics(), self._enqueue(
                _Write(self._future(), job=partial(self._purge, self.node_id, "self", 0))))
        finally:  # nothing may use the client after it is closed (it would open a new connection)
            await self._tasks.stop("sweeper", 1.0)
            await self._tasks.stop("membership-writer", 1.0)
            await self.redis.aclose()

    async def heartbeat(self) -> None:
        """Renew liveness; re-register when swept or after a failed update; sweep the dead.

        The sweep runs in a task of its own: a dead node with many members
        takes many steps to remove, and this node's own renewal must never
        wait behind them.
        """
        now = _now_ms()
        if self._dirty:
            await self._register()
        elif await self._call("heartbeat", [self.keys.nodes, self.keys.node(self.node_id)],
                              [self._expiry(now), now]) == 0:
            self._registered = False
            log.warning("node %s found its registry entry gone (swept or Redis data lost): "
                        "re-registering", self.node_id)
            await self._register()
        self._tasks.spawn("sweeper", self._sweep_once)

    async def _sweep_once(self) -> None:
        try:
            await self.sweep()
        except (RedisError, TimeoutError, OSError) as exc:  # Redis trouble: the next heartbeat tries again
            log.warning("sweep failed (%s): %s", type(exc).__name__, exc)

    async def sweep(self, now: int | None = None) -> list[str]:
        """Remove every node whose heartbeat expired; returns those this call swept."""
        now = _now_ms() if now is None else now
        dead = await self._deadline(self.redis.zrangebyscore(self.keys.nodes, "-inf", now))
        swept = []
        for raw in dead:
            node = text(raw)
            if node != self.node_id and await self._purge(node, "sweep", now) == 2:
                swept.append(node)
                log.warning("swept dead node %s", node)
        self.swept_nodes += len(swept)
        return swept

    # -- updates -----------------------------------------------------------------
    async def add_connection(self, conn_id: str, user_id: str | None, limit: int = 0) -> bool | None:
        """Count a connection; with `limit`, check the user's cluster-wide count in the same step.

        Sent even while the store awaits a re-registration (idempotent, and the
        re-registration rebuilds the counts anyway), so the limit is checked
        whenever Redis can answer. None: it could not be checked (Redis down,
        or this node not registered at the moment).
        """
        k, node = self.keys, self.node_id
        keys = [k.nodes, k.node(node), k.node_users(node), k.online, k.node_conns(node)]
        result = await self._enqueue(_Write(self._future(), "connect", keys, [node, conn_id, user_id or "", limit]))
        if result is None or result == -1:
            return None
        return bool(result != REFUSED)

    async def remove_connection(self, conn_id: str, user_id: str | None, rooms: Sequence[str],
                                emptied: Collection[str] = ()) -> None:
        k, node = self.keys, self.node_id
        keys = [k.nodes, k.node(node), k.node_users(node), k.online, k.node_rooms(node), k.node_conns(node),
                k.rooms, *(k.members(r) for r in rooms)]
        flags = ["1" if r in emptied else "0" for r in rooms]
        await self._update("disconnect", keys, [conn_id, user_id or "", len(rooms), *rooms, *flags])

    async def add_member(self, room: str, conn_id: str, user_id: str | None) -> None:
        k, node = self.keys, self.node_id
        keys = [k.nodes, k.members(room), k.rooms, k.node_rooms(node), k.node_conns(node)]
        await self._update("join", keys, [room, conn_id, user_id or ""])

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        k = self.keys
        keys = [k.nodes, k.members(room), k.rooms, k.node_rooms(self.node_id)]
        await self._update("leave", keys, [room, conn_id, "1" if emptied else "0"])

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

    async def nodes(self) -> list[NodeInfo]:
        return await self._query(inspect.live_nodes(self.keys))

    async def _query(self, query: Query[T]) -> T:
        return await drive_async(query, lambda step: self._deadline(run_step(self.redis, step)))

    # -- metrics snapshots (the cluster dashboard) ---------------------------------
    async def put_metrics(self, payload: bytes) -> None:
        """Store this node's metrics snapshot, expiring 3 heartbeats later like its registry entry.

        A node that dies takes its numbers with it: no dashboard shows a dead
        node's counters as if they were current.
        """
        await self._deadline(self.redis.set(self.keys.node_metrics(self.node_id), payload,
                                            px=int(3 * self.heartbeat_interval * 1000)))

    async def node_metrics(self, node_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored snapshots of `node_ids`, one round trip; a node without one is left out.

        A pipeline of GETs rather than one MGET: each node's key may live in
        another hash slot of a Redis Cluster, where a multi-key MGET fails.
        """
        if not node_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for node in node_ids:
            pipe.get(self.keys.node_metrics(node))
        found = await self._deadline(pipe.execute())
        return {node: raw if isinstance(raw, bytes) else text(raw).encode()
                for node, raw in zip(node_ids, found, strict=True) if raw is not None}

    async def _forget_metrics(self) -> None:
        """Delete this node's snapshot on drain, so a dashboard drops it at once (it expires anyway)."""
        try:
            await self._deadline(self.redis.delete(self.keys.node_metrics(self.node_id)))
        except (RedisError, TimeoutError, OSError) as exc:
            log.warning("could not delete this node's metrics snapshot (%s): it expires in 3 heartbeats",
                        type(exc).__name__)

    # -- bounded multi-step work ---------------------------------------------------
    async def _purge(self, node: str, mode: str, now: int) -> int:
        """Remove `node`'s members, counts and keys in bounded steps.

        mode 'sweep' (a dead node: every step re-checks that it is still
        dead, and claims it), 'self' (drain) or 'reset' (before
        re-registering: every step renews this node's expiry). Returns
        purge_end's answer: 2 when this call removed a swept node, -1 when a
        swept node turned out to be alive or a reset node was claimed.
        """
        k = self.keys
        rooms_key, users_key = k.node_rooms(node), k.node_users(node)

        def stamp() -> int:
            return self._expiry(_now_ms()) if mode == "reset" else now

        while True:
            found: Any = await self._deadline(self.redis.srandmember(rooms_key, ROOMS_PER_ROUND))
            rooms = [text(r) for r in found or ()]
            if rooms and not await self._purge_rooms(node, rooms, mode, stamp):
                return -1
            for script, key in (("purge_users", [k.nodes, users_key, k.online]),
                                ("purge_conns", [k.nodes, k.node_conns(node)])):
                cursor = "0"
                while True:
                    cursor = text(await self._call(script, key, [cursor, STEP, mode, stamp()], node=node))
                    if cursor == "-1":
                        return -1
                    if cursor == "0":
                        break
            done = await self._call("purge_end", [k.nodes, k.node(node), rooms_key, users_key, k.node_conns(node)],
                                    [mode, stamp()], node=node)
            if done != 0:
                return int(done)

    async def _purge_rooms(self, node: str, rooms: list[str], mode: str, stamp: Callable[[], int]) -> bool:
        """Clean `node` out of `rooms`, one pipelined step per room per round trip; False if it is alive."""
        k = self.keys
        cursors = dict.fromkeys(rooms, "0")
        while cursors:
            batch = list(cursors.items())
            replies = await self._pipeline([
                ("purge_room", [k.nodes, k.members(room), k.rooms, k.node_rooms(node)],
                 [node, room, cursor, STEP, mode, stamp()]) for room, cursor in batch])
            for (room, _), reply in zip(batch, replies, strict=True):
                cursor = text(reply)
                if cursor == "-1":
                    return False
                if cursor == "0":
                    del cursors[room]
                else:
                    cursors[room] = cursor
        return True

    async def _reregister(self, snapshot: list[tuple[str, str, list[str]]], info: bytes) -> int:
        """A whole re-registration, in bounded steps: claim, clear the old, add the new, finish.

        Every step renews the node's expiry, so a long one is not swept while
        it runs; a step that finds the node claimed by a sweep stops it (-1:
        the next heartbeat starts over). The result is checked against the
        snapshot: nothing else writes for this node meanwhile, so any other
        count means the registration did not hold.
        """
        k, node = self.keys, self.node_id
        await self._call("register_begin", [k.nodes, k.node(node)], [self._expiry(_now_ms()), info])
        if await self._purge(node, "reset", 0) != 1:
            return -1
        conns = [[conn, user] for conn, user, _ in snapshot]
        for start in range(0, len(conns), REGISTER_STEP):
            if await self._call("register_conns", [k.nodes, k.node_conns(node), k.node_users(node), k.online],
                                [orjson.dumps(conns[start:start + REGISTER_STEP]), self._expiry(_now_ms())]) == -1:
                return -1
        by_room: dict[str, list[list[str]]] = {}
        for conn, user, rooms in snapshot:
            for room in rooms:
                by_room.setdefault(room, []).append([conn, user])
        batches = [(room, members[i:i + REGISTER_STEP]) for room, members in by_room.items()
                   for i in range(0, len(members), REGISTER_STEP)]
        for start in range(0, len(batches), ROOMS_PER_ROUND):  # one round trip for many small rooms
            replies = await self._pipeline([
                ("register_room", [k.nodes, k.members(room), k.rooms, k.node_rooms(node)],
                 [node, room, orjson.dumps(members), self._expiry(_now_ms())])
                for room, members in batches[start:start + ROOMS_PER_ROUND]])
            if -1 in replies:
                return -1
        now = _now_ms()
        clients = int(await self._call("register_end", [k.nodes, k.node(node), k.node_conns(node)],
                                       [self._expiry(now), now]))
        if clients != len(snapshot):
            log.warning("re-registration of %s found %d connections in Redis, expected %d: retrying",
                        node, clients, len(snapshot))
            return -1
        return clients

    # -- the ordered writer --------------------------------------------------------
    async def _update(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Queue one change; on failure it is counted and reconciled on the next heartbeat."""
        if self._dirty:
            return None  # the coming re-registration reads the table, this change included
        return await self._enqueue(_Write(self._future(), name, keys, [self.node_id, *args]))

    async def _enqueue(self, write: _Write) -> Any:
        """Queue a write behind every change made before it; its result (None if it failed).

        The writer resolves every future it takes, even when it crashes (its
        supervisor restarts it), and every Redis call it makes has a deadline,
        so no caller waits for ever.
        """
        if not (self._tasks.running("membership-writer") or "membership-writer" in self._tasks.down):
            self._resolve(write, ConnectionError("membership writer is not running"))
        else:
            self._queue.append(write)
            self._wake.set()
        return await asyncio.shield(write.future)

    async def _write_loop(self) -> None:
        batch: list[_Write] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    batch, self._queue = self._queue, []
                    await self._send(batch)
                    batch = []
        finally:  # cancelled or crashed: nobody may wait for ever on what was taken or queued
            for write in [*batch, *self._queue]:
                self._resolve(write, ConnectionError("membership writer stopped"))
            self._queue = []

    async def _send(self, batch: list[_Write]) -> None:
        """Runs of scripts go as one pipeline each, jobs alone, all in queue order."""
        run: list[_Write] = []
        for write in batch:
            if write.job is None:
                run.append(write)
                continue
            if run:
                await self._send_scripts(run)
                run = []
            try:
                result = await write.job()
            except Exception as exc:
                result = exc
            self._resolve(write, result)
        if run:
            await self._send_scripts(run)

    async def _send_scripts(self, run: list[_Write]) -> None:
        try:
            results = await self._pipeline([(w.name, w.keys, w.args) for w in run], raise_on_error=False)
        except Exception as exc:  # any failure fails the batch; none may kill the writer
            results = [exc] * len(run)
        for write, result in zip(run, results, strict=True):
            self._resolve(write, result)

    async def _pipeline(self, calls: list[tuple[str, list[str], list[Any]]], raise_on_error: bool = True) -> list[Any]:
        """Run scripts (name, keys, args) in one round trip, in order, with a deadline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                await self._scripts[name](keys=keys, args=args, client=pipe)
            return list(await self._deadline(pipe.execute(raise_on_error=raise_on_error)))

    def _resolve(self, write: _Write, result: Any) -> None:
        if isinstance(result, BaseException):
            self.failed_updates += 1
            self._dirty = True
            log.warning("membership update %s failed (%s): reconciling on next heartbeat",
                        write.name or "job", result or type(result).__name__)
            result = None
        elif result == -1:  # the node is not registered (swept, claimed, or Redis lost its data)
            self._dirty = True
            self._registered = False
        if not write.future.done():
            write.future.set_result(result)

    async def _register(self) -> bool:
        """Queue a full re-registration from the table as it is now; True if it went through."""
        snapshot = [(conn, user or "", sorted(rooms)) for conn, user, rooms in self._snapshot()]
        info = orjson.dumps({"started_at": self.started_at, "address": self.address, "version": self.version,
                             "heartbeat_at": _now_ms(), "heartbeat_interval": self.heartbeat_interval})
        self._dirty = False
        result = await self._enqueue(_Write(self._future(), "register", job=partial(self._reregister, snapshot, info)))
        if result is None or result == -1:
            self._dirty = True
            self._registered = False
            return False
        self.registrations += 1
        self._registered = True
        return True

    # -- internals ---------------------------------------------------------------
    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _expiry(self, now: int) -> int:
        return now + int(3 * self.heartbeat_interval * 1000)

    async def _call(self, name: str, keys: list[str], args: list[Any], node: str | None = None) -> Any:
        return await self._deadline(self._scripts[name](keys=keys, args=[node or self.node_id, *args]))

    async def _deadline(self, awaitable: Awaitable[T]) -> T:
        """Every await on Redis has a deadline, whatever the client's own settings."""
        async with asyncio.timeout(self.timeout):
            return await awaitable

    async def _refuse_cluster(self) -> None:
        """A Redis Cluster node would take our multi-key scripts and fail them later: refuse now."""
        try:
            info = await self._deadline(self.redis.info("cluster"))
        except (RedisError, TimeoutError):
            return  # unreachable now: the heartbeat registers once it is back
        if str(info.get("cluster_enabled", "0")) == "1":
            raise RedisClusterUnsupported(
                "the Redis at --redis-url runs in cluster mode, which hubnode does not support yet: "
                "use a single Redis primary (or one managed by Sentinel)")

    async def _warn_on_eviction(self) -> None:
        try:
            policy = (await self._deadline(self.redis.config_get("maxmemory-policy"))).get("maxmemory-policy")
        except (RedisError, TimeoutError):
            return  # CONFIG may be disabled on managed Redis
        if policy and text(policy) != "noeviction":
            log.warning("Redis maxmemory-policy is %r: membership keys may be evicted; "
                        "set it to 'noeviction'", text(policy))


class RedisClusterUnsupported(RuntimeError):
    """--redis-url points at a Redis Cluster node."""


def _now_ms() -> int:
    return int(time.time() * 1000)
