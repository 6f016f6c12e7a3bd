"""Membership in Redis, readable with redis-cli (docs/redis.md, its key table).

One layout serves a single Redis and a Redis Cluster: every Lua script (and
every pipelined command) touches keys of ONE hash slot, and every key a script
touches is passed in KEYS, built by `publisher.keys.Keys` (no script builds a
key name). A node's keys share the slot of `{<node id>}`, a room's members
hash the slot of `{<room>}`, a user's online hash the slot of `{<user id>}`;
the registry index `hub:nodes` is written only by commands and scripts of its
own. A room's members hash is written only by the member scripts
(member_add, member_remove, purge_members), which keep its presence hash
(user -> connections in the room) in step and publish the room's presence
events from inside the same script (docs/protocol.md): whichever node
joins, leaves, disconnects, drains, re-registers or sweeps a dead node, a
user's first arrival and last departure are each announced exactly once.

So a change that spans slots is a few single-slot steps, ordered so that
the node's own indexes (`…:rooms`, `…:users`) are always SUPERSETS of what the
room and user hashes hold: a step that adds to an index runs before the member
is written, a step that removes from it after the member is gone. Sweeps and
listings read the indexes and so never miss an entry.

The client may be `redis.asyncio.Redis` or `redis.asyncio.cluster.RedisCluster`.
Pipelines send script calls as raw EVALSHA (a cluster pipeline refuses the
`evalsha` method and loads no script); an answer of NOSCRIPT (a restarted or
promoted primary) loads every script and fails that write, which the node then
reconciles like any failed write (below).

One writer task sends a node's changes in the order the node made them. A
batch of queued changes goes as up to three pipelined rounds, one per phase
of `hubnode.membership.changes` (add to the node's indexes, write the room
and user hashes, remove from the node's indexes); within a phase, steps keep
their queue order (one slot lives on one connection of one Redis), and a
change that depends on an earlier one's last phase starts a new group of
rounds, so every change lands as if sent alone, in order. A
re-registration's snapshot, taken when it is queued, sits in that order too,
so no change can land on the wrong side of it, and a connection storm costs
round trips per batch, not per change. Connect and disconnect are also
idempotent (the node's conns set decides whether counts move). An update
that fails (timeout, Redis restart, NOSCRIPT) is never silently lost: it is
counted and the node re-registers its whole local state on the next
heartbeat, which rebuilds its entries exactly. A step that finds the node
unregistered (its hash's `expiry` is 0 or gone: claimed by a sweep, swept,
or Redis lost its data), or a heartbeat that finds the node missing from
`hub:nodes`, does the same.

Work proportional to a node's size (sweeping a dead node, draining,
re-registering) is done in bounded steps: each script handles one room's or
user's next few hundred entries, or a few hundred connections, so no single
script stalls Redis, however large the rooms. Each round of deletions in room
and user slots comes right after a guarded node-slot step that re-checks that
a swept node is still dead, so a node that comes back mid-sweep stops the
sweep at that step.

The race that remains: the room- and user-slot deletions of a sweep cannot
be guarded (the node's `expiry` lives in another slot). A sweeper that
stalls between its guarded node-slot step and the round of deletions after
it (one round trip; a GC pause, a network stall) while the swept node comes
back and re-registers can then delete members (or online entries) that the
node has just re-added. The sweeper's next guarded step then finds the node
alive: it stops the sweep and sets `resync` in the node's hash, and the
node's next heartbeat re-registers, which puts them back. So Redis misses at
most one round (`ROOMS_PER_ROUND` rooms or `USERS_PER_ROUND` users) of that
node's entries for at most one heartbeat; only a sweeper that dies right
after such a stale round (it never reaches its next guarded step) leaves
them missing until the node's next re-registration for another reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from hubnode.broker.base import BrokerUnavailable
from hubnode.membership.base import Member, NodeInfo, Presence, SnapshotSource, Stats, StoreCounters
from hubnode.membership.changes import REFUSED, Change, Changes, Plan, Step, groups, no_events, one_slot
from hubnode.supervisor import Supervisor
from publisher import inspect
from publisher.envelope import new_message_id
from publisher.keys import Keys
from publisher.query import Query, drive_async, run_step, text

T = TypeVar("T")

__all__ = ["RedisMembershipStore"]

log = logging.getLogger(__name__)

_SCRIPTS = ("heartbeat", "node_connect", "user_connect", "node_disconnect", "node_join", "node_leave",
            "member_add", "member_remove", "purge_members",
            "purge_next", "purge_hash", "purge_conns", "purge_end", "registry",
            "register_begin", "register_conns", "register_rooms", "register_end")

STEP = 200
"""Members (or connections) one bounded script handles: about a millisecond of Redis time at most."""

REMOVED_WINDOW = 600.0
"""Seconds a removed room or user name is remembered for a reconcile after a failover."""

REMOVED_MAX = 10_000
"""Names remembered at most (the oldest are forgotten first)."""

REGISTER_STEP = 100
"""Connections or members one re-registration step adds (decoding JSON costs more than deleting)."""

ROOMS_PER_ROUND = 64
"""Rooms whose purge steps share one pipeline round trip."""

USERS_PER_ROUND = 200
"""Users whose online hashes are purged in one round trip (each is usually one short step)."""


def _load_scripts() -> dict[str, str]:
    folder = resources.files("hubnode.membership") / "lua"
    common = (folder / "common.lua").read_text()
    return {name: common + "\n" + (folder / f"{name}.lua").read_text() for name in _SCRIPTS}


Job = Callable[[], Awaitable[Any]]

Keep = Mapping[str, Collection[str]]
"""room -> the connections of this node that are in it (what a re-registration keeps)."""

Purger = tuple[Callable[[str, str], Step], Callable[[str, Any], str], bool]
"""How the entries of one index's names go: (the step for a name at a cursor, its reply -> the next cursor
('0': done), whether a finished name leaves the index at once)."""

Stale = dict[str, list[str]]
"""room -> this node's members found there that its table no longer has (a re-registration's scan)."""


def _settled(name: str, reply: Any) -> str:
    """A purge script's reply is its next cursor; it removed what it found itself."""
    return text(reply)


@dataclass(slots=True)
class _Write:
    """One queued write: a phased change, or a multi-step job that runs alone, in order."""

    future: asyncio.Future[Any]
    name: str = ""
    change: Change | None = None
    job: Job | None = None


class RedisMembershipStore:
    """A MembershipStore on one Redis (or a Sentinel-managed primary) or on a Redis Cluster."""

    def __init__(self, client: aioredis.Redis | RedisCluster, keys: Keys, node_id: str, *, heartbeat: float = 2.0,
                 address: str = "", version: str = "", timeout: float = 5.0,
                 announces: Callable[[str], bool] | None = None, sharded: bool = False) -> None:
        """`announces(room)`: whether the room's members get presence events (--presence-rooms);
        `sharded`: they go out with SPUBLISH (a Redis Cluster)."""
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
        # rooms and users this node removed entries from lately: a failover of their shard may
        # bring a deleted entry back after the node's index forgot the name (see reconcile)
        self._removed: dict[tuple[str, str], float] = {}
        self._sweep_removed = False
        self._registered = False  # the node's entry is known to be in Redis (readiness)
        self._snapshot: SnapshotSource = lambda: ()
        self._scripts = {name: client.register_script(src) for name, src in _load_scripts().items()}
        self._announces = announces or _never
        self._sharded = "1" if sharded else "0"
        self._changes = Changes(keys, node_id, self._event_args)
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

    def reconcile(self) -> None:
        """Re-register at the next heartbeat: a failover may have lost writes (replication is asynchronous).

        A lost write may be an add (the re-registration rewrites it) or a
        delete whose name the node's index no longer lists: the
        re-registration also clears this node's entries from the rooms and
        users it removed entries from in the last REMOVED_WINDOW seconds.
        """
        self._dirty = True
        self._sweep_removed = True

    def _note_removed(self, kind: str, names: Iterable[str]) -> None:
        now = time.monotonic()
        removed = self._removed
        for name in names:
            removed.pop((kind, name), None)
            removed[(kind, name)] = now  # newest last
        while removed and (len(removed) > REMOVED_MAX or next(iter(removed.values())) < now - REMOVED_WINDOW):
            del removed[next(iter(removed))]

    async def heartbeat(self) -> None:
        """Renew liveness; re-register when swept or after a failed update; sweep the dead.

        The node's hash says whether it is registered (or must resync); its
        `hub:nodes` entry is then renewed, and a ZADD that had to add it back
        (the index lost it) also means re-registering. The sweep runs in a
        task of its own: a dead node with many members takes many steps to
        remove, and this node's own renewal must never wait behind them.
        """
        now = _now_ms()
        k, node = self.keys, self.node_id
        if self._dirty:
            await self._register()
        elif (await self._call("heartbeat", [k.node(node)], [self._expiry(now), now]) == 0
              or await self._deadline(self.redis.zadd(k.nodes, {node: self._expiry(now)})) == 1):
            self._registered = False
            log.warning("node %s found its registry entry gone or stale (swept, Redis data lost, or a "
                        "sweep it stopped by coming back): re-registering", node)
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
        result = await self._enqueue(self._write(self._changes.connect(conn_id, user_id or "", limit)))
        if result is None or result == -1:
            return None
        return bool(result != REFUSED)

    async def remove_connection(self, conn_id: str, user_id: str | None, rooms: Sequence[str],
                                emptied: Collection[str] = ()) -> None:
        gone = [room for room in rooms if room in emptied]
        self._note_removed("room", rooms)
        if user_id:
            self._note_removed("user", (user_id,))
        await self._update(self._write(self._changes.disconnect(conn_id, user_id or "", rooms, gone)))

    async def add_member(self, room: str, conn_id: str, user_id: str | None) -> None:
        await self._update(self._write(self._changes.join(room, conn_id, user_id or "")))

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        self._note_removed("room", (room,))
        await self._update(self._write(self._changes.leave(room, conn_id, emptied)))

    def _write(self, change: Change) -> _Write:
        return _Write(self._future(), change.name, change)

    def _event_args(self, room: str) -> tuple[Any, ...]:
        """The event arguments of a step that writes `room`'s members (common.lua): one id base per step."""
        if not self._announces(room):
            return no_events(room)
        return ("1", self.keys.room_channel(room), self._sharded, self.node_id, new_message_id(),
                int(time.time()), room)

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

    async def presence(self, room: str) -> Presence:
        """One atomic read (presence.lua); BrokerUnavailable when Redis cannot answer now."""
        try:
            return await self._query(inspect.presence(self.keys, room))
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"presence cannot be read now: {exc}") from None

    async def nodes(self) -> list[NodeInfo]:
        return await self._query(inspect.live_nodes(self.keys))

    async def _query(self, query: Query[T]) -> T:
        """A read of the cluster's state; BrokerUnavailable when Redis cannot answer now."""
        try:
            return await drive_async(query, lambda step: self._deadline(run_step(self.redis, step)))
        except (RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis cannot answer now: {type(exc).__name__}") from None

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

        A pipeline of GETs rather than one MGET: each node's key lives in the
        hash slot of its node, where a multi-key MGET fails on a Redis Cluster.
        """
        if not node_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for node in node_ids:
            pipe.get(self.keys.node_metrics(node))
        try:
            found = await self._deadline(pipe.execute())
        except (RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis cannot answer now: {type(exc).__name__}") from None
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
    async def _purge(self, node: str, mode: str, now: int, keep: Keep | None = None,
                     stale: Stale | None = None) -> int:
        """Remove `node`'s members, online entries and keys in bounded steps.

        mode 'sweep' (a dead node: every node-slot step re-checks that it is
        still dead, and the first claims it; a node found alive after that is
        told to re-register, see the module docstring), 'self' (drain) or
        'reset' (before re-registering: every step renews this node's expiry).
        Returns 2 when this call removed a swept node from the registry, 1
        when the node's entries are gone, -1 when a swept node turned out to
        be alive or a reset node was claimed. A reset (with `keep`: room ->
        the node's connections in it now) deletes no member and keeps the
        node's rooms index: it fills `stale` with the members the node no
        longer has, which the re-registration removes after it rewrote the
        others (see `_reregister`).
        """
        k = self.keys

        def stamp() -> int:
            return self._expiry(_now_ms()) if mode == "reset" else now

        if mode == "sweep":  # claim it: its hash first (the guard of every step), then the index
            if await self._call("purge_next", [k.node(node), k.node_rooms(node)], ["claim", now, "set", "0", 0]) == -1:
                return -1
            await self._call("registry", [k.nodes], ["claim", node, now])
        while True:
            for kind, index, purger, per_round in (
                    ("set", k.node_rooms(node), self._room_purger(node, keep, stale), ROOMS_PER_ROUND),
                    ("hash", k.node_users(node), self._user_purger(node), USERS_PER_ROUND)):
                if not await self._purge_index(node, mode, stamp, (kind, index), purger, per_round):
                    return -1
            cursor = "0"
            while True:
                cursor = text(await self._call("purge_conns", [k.node(node), k.node_conns(node)],
                                               [mode, stamp(), cursor, STEP]))
                if cursor == "-1":
                    return -1
                if cursor == "0":
                    break
            done = int(await self._call("purge_end", [k.node(node), k.node_rooms(node), k.node_users(node),
                                                      k.node_conns(node)], [mode, stamp()]))
            if done != 0:
                break
        if done == -1 or mode == "reset":
            return done
        if mode == "self":
            await self._deadline(self.redis.zrem(k.nodes, node))
            return 1
        return 2 if await self._call("registry", [k.nodes], ["drop", node, now]) == 1 else 1

    def _room_purger(self, node: str, keep: Keep | None, stale: Stale | None) -> Purger:
        """How a room's members of `node` go: all of them (purge_members.lua, announcing the leaves), or, with
        `keep`, none yet: each step reads a page of the node's members (HSCAN) and notes in `stale` those the
        node no longer has (every room it reads gets an entry), and the room stays in the node's index."""
        if keep is None or stale is None:
            return (lambda room, cursor: self._changes.purge_members(room, node, cursor, STEP), _settled, True)
        kept, found_stale = keep, stale

        def scan(room: str, cursor: str) -> Step:
            return Step("HSCAN", (self.keys.members(room),), (cursor, "MATCH", f"{node}:*", "COUNT", STEP))

        def settle(room: str, reply: Any) -> str:
            cursor, found = reply
            mine = kept.get(room, frozenset())
            found_stale.setdefault(room, []).extend(conn for conn in map(text, found) if conn not in mine)
            return text(cursor)
        return scan, settle, False

    def _user_purger(self, node: str) -> Purger:
        return (lambda user, cursor: Step("purge_hash", (self.keys.online(user),), (node, cursor, STEP)),
                _settled, True)

    async def _purge_index(self, node: str, mode: str, stamp: Callable[[], int], index: tuple[str, str],
                           purger: Purger, per_round: int) -> bool:
        """Delete `node`'s entries from the hash of every name in one of its indexes; False if it is alive.

        Each round: a guarded node-slot step (drops the names finished last
        round, hands out the next page of the index), then one pipelined
        step per name in progress, each in its own slot (a room's through
        purge_members.lua, which announces the leaves, or, resetting, a read
        of what is stale; a user's through purge_hash.lua). A finished name
        is dropped from the index by the next guarded step, unless the
        purger keeps names (a reset's rooms). `index`: ("set", the node's
        rooms key) or ("hash", its users key).
        """
        step_of, settle, drops = purger
        kind, key = index
        active: dict[str, str] = {}  # name -> HSCAN cursor of its hash
        done: list[str] = []
        cursor, scanned = "0", False  # the index's own SSCAN/HSCAN cursor
        while True:
            want = 0 if scanned else max(0, per_round - len(active))
            reply = await self._call("purge_next", [self.keys.node(node), key],
                                     [mode, stamp(), kind, cursor, want, *done])
            if isinstance(reply, int):  # -1: alive (or, resetting, claimed)
                return False
            if want:
                cursor = text(reply[0])
                scanned = cursor == "0"
                for name in map(text, reply[1]):
                    active.setdefault(name, "0")
            if not active and scanned:
                return True
            if not active:
                done = []
                continue
            batch = list(active.items())
            replies = await self._checked([step_of(name, at) for name, at in batch]
                                          + self._renewal(node, mode, stamp))
            done = []
            for (name, _), reply in zip(batch, replies[:len(batch)], strict=True):
                active[name] = settle(name, reply)
                if active[name] == "0":
                    del active[name]
                    if drops:
                        done.append(name)

    async def _purge_removed(self, node: str, keep: Keep, stale: Stale) -> None:
        """Clear this node's entries from the online hashes of recently removed users, and note its stale members
        of recently removed rooms in `stale` (see reconcile), in bounded steps."""
        purgers = {"room": self._room_purger(node, keep, stale), "user": self._user_purger(node)}
        active = dict.fromkeys(self._removed, "0")
        while active:
            batch = list(active.items())[:ROOMS_PER_ROUND]
            replies = await self._checked([purgers[kind][0](name, at) for (kind, name), at in batch])
            for (name_of, _), reply in zip(batch, replies, strict=True):
                active[name_of] = purgers[name_of[0]][1](name_of[1], reply)
                if active[name_of] == "0":
                    del active[name_of]

    def _renewal(self, node: str, mode: str, stamp: Callable[[], int]) -> list[Step]:
        """While this node re-registers, its `hub:nodes` score moves on with its expiry (for listings)."""
        if mode != "reset":
            return []
        return [Step("ZADD", (self.keys.nodes,), ("GT", stamp(), node))]

    async def _reregister(self, snapshot: list[tuple[str, str, list[str]]], info: bytes) -> int:
        """A whole re-registration, in bounded steps: claim, clear the old, add the new, finish.

        Every node-slot step renews the node's expiry, so a long one is not
        swept while it runs; a step that finds the node claimed by a sweep
        stops it (-1: the next heartbeat starts over). Connections go into the
        node's indexes before their users' online hashes, rooms into its index
        before their members hashes. The result is checked against the
        snapshot: nothing else writes for this node meanwhile, so any other
        count means the registration did not hold.
        """
        k, node = self.keys, self.node_id

        def stamp() -> int:
            return self._expiry(_now_ms())

        await self._load_all_scripts()  # a new or restarted Redis: no pipelined step meets NOSCRIPT
        await self._call("register_begin", [k.node(node)], [stamp(), info])
        await self._deadline(self.redis.zadd(k.nodes, {node: stamp()}))
        keep: dict[str, set[str]] = {}
        for conn, _, rooms in snapshot:
            for room in rooms:
                keep.setdefault(room, set()).add(conn)
        stale: Stale = {}
        if await self._purge(node, "reset", 0, keep, stale) != 1:
            return -1
        if self._sweep_removed:
            self._sweep_removed = False  # a reconcile asked from here on sets it again
            try:
                await self._purge_removed(node, keep, stale)
            except BaseException:
                self._sweep_removed = True  # the next re-registration does it again
                raise
        conns = [(conn, user) for conn, user, _ in snapshot]
        for start in range(0, len(conns), REGISTER_STEP):
            part = conns[start:start + REGISTER_STEP]
            if await self._call("register_conns", [k.node(node), k.node_conns(node), k.node_users(node)],
                                [stamp(), orjson.dumps(part)]) == -1:
                return -1
            by_user: dict[str, list[str]] = {}
            for conn, user in part:
                if user:
                    by_user.setdefault(user, []).extend((conn, node))
            await self._checked([Step("HSET", (k.online(user),), tuple(pairs)) for user, pairs in by_user.items()]
                                + self._renewal(node, "reset", stamp))
        by_room: dict[str, list[str]] = {}
        for conn, user, rooms in snapshot:
            for room in rooms:
                by_room.setdefault(room, []).extend((conn, user))
        batches = [(room, pairs[i:i + 2 * REGISTER_STEP]) for room, pairs in by_room.items()
                   for i in range(0, len(pairs), 2 * REGISTER_STEP)]
        for start in range(0, len(batches), ROOMS_PER_ROUND):  # one round trip for many small rooms
            part_rooms = batches[start:start + ROOMS_PER_ROUND]
            if await self._call("register_rooms", [k.node(node), k.node_rooms(node)],
                                [stamp(), *dict.fromkeys(room for room, _ in part_rooms)]) == -1:
                return -1
            await self._checked([self._changes.add_members(room, pairs) for room, pairs in part_rooms]
                                + self._renewal(node, "reset", stamp))
        if await self._drop_stale(node, stale, keep, stamp) == -1:
            return -1
        now = _now_ms()
        clients = int(await self._call("register_end", [k.node(node), k.node_conns(node)], [self._expiry(now), now]))
        if clients != len(snapshot):
            log.warning("re-registration of %s found %d connections in Redis, expected %d: retrying",
                        node, clients, len(snapshot))
            return -1
        await self._deadline(self.redis.zadd(k.nodes, {node: self._expiry(now)}))
        return clients

    async def _drop_stale(self, node: str, stale: Stale, keep: Keep, stamp: Callable[[], int]) -> int:
        """The end of a re-registration's member rewrite: remove the members the node no longer has (after
        the others were re-added, so a user who is still here through another connection is not announced
        leaving), then take out of the node's index the rooms where it has none left. -1: claimed meanwhile."""
        removals = [self._changes.remove_members(room, conns[i:i + STEP])
                    for room, conns in stale.items() for i in range(0, len(conns), STEP)]
        for start in range(0, len(removals), ROOMS_PER_ROUND):
            await self._checked(removals[start:start + ROOMS_PER_ROUND] + self._renewal(node, "reset", stamp))
        gone = [room for room in stale if room not in keep]
        for start in range(0, len(gone), REGISTER_STEP):
            reply = await self._call("purge_next", [self.keys.node(node), self.keys.node_rooms(node)],
                                     ["reset", stamp(), "set", "0", 0, *gone[start:start + REGISTER_STEP]])
            if isinstance(reply, int):
                return -1
        return 1

    # -- the ordered writer --------------------------------------------------------
    async def _update(self, write: _Write) -> Any:
        """Queue one change; on failure it is counted and reconciled on the next heartbeat."""
        if self._dirty:
            return None  # the coming re-registration reads the table, this change included
        return await self._enqueue(write)

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
        """Runs of changes go as phased rounds, jobs alone, all in queue order."""
        run: list[_Write] = []
        for write in batch:
            if write.job is None:
                run.append(write)
                continue
            if run:
                await self._send_changes(run)
                run = []
            try:
                result = await write.job()
            except Exception as exc:
                result = exc
            self._resolve(write, result)
        if run:
            await self._send_changes(run)

    async def _send_changes(self, run: list[_Write]) -> None:
        """Send a run of changes as groups of phased rounds (see changes.groups), in order.

        Once a group fails as a whole (Redis unreachable), the rest of the run
        fails at once: the re-registration that follows rebuilds it all anyway.
        """
        failure: BaseException | None = None
        for group in groups(run, _change_of):
            if failure is None:
                try:
                    await self._send_group(group)
                    continue
                except Exception as exc:  # any failure fails the group; none may kill the writer
                    failure = exc
            for write in group:
                if not write.future.done():
                    _change_of(write).plan.close()
                    self._resolve(write, failure)

    async def _send_group(self, group: list[_Write]) -> None:
        """Drive the plans of `group` in lock step: one pipelined round per phase."""
        plans = [_change_of(write).plan for write in group]
        steps: dict[int, list[Step]] = {}
        for i, write in enumerate(group):
            self._advance(write, plans[i], None, steps, i)
        while steps:
            order = list(steps)
            flat = [step for i in order for step in steps[i]]
            replies = await self._pipeline(flat) if flat else []
            pending, steps, at = steps, {}, 0
            for i in order:
                mine, at = replies[at:at + len(pending[i])], at + len(pending[i])
                error = next((r for r in mine if isinstance(r, Exception)), None)
                if error is not None:
                    plans[i].close()
                    self._resolve(group[i], error)
                else:
                    self._advance(group[i], plans[i], mine, steps, i)

    def _advance(self, write: _Write, plan: Plan, replies: list[Any] | None, steps: dict[int, list[Step]],
                 i: int) -> None:
        """Give a plan its replies; record its next phase's steps, or resolve it when it is done."""
        try:
            steps[i] = next(plan) if replies is None else plan.send(replies)
        except StopIteration as finished:
            self._resolve(write, finished.value)
        except Exception as exc:  # a bug in a plan fails that write, not the writer
            self._resolve(write, exc)

    async def _pipeline(self, steps: list[Step]) -> list[Any]:
        """Run single-slot steps in one round trip, in order per slot, with a deadline.

        Errors come back in place of their replies. A NOSCRIPT answer loads
        every script (the next try finds them) and stays an error: the steps
        after it in the same slot ran, so resending it alone could reorder.
        """
        pipe = self.redis.pipeline(transaction=False)
        for step in steps:
            script = self._scripts.get(step.name)
            if script is None:
                pipe.execute_command(step.name, *step.keys, *step.args)
            else:
                assert one_slot(step.keys), f"{step.name} touches keys of several slots: {step.keys}"
                pipe.execute_command("EVALSHA", script.sha, len(step.keys), *step.keys, *step.args)
        replies = list(await self._deadline(pipe.execute(raise_on_error=False)))
        if any(isinstance(r, NoScriptError) for r in replies):
            await self._load_all_scripts()
        return replies

    async def _checked(self, steps: list[Step]) -> list[Any]:
        """`_pipeline`, raising the first error (for the multi-step jobs, which retry from the start)."""
        replies = await self._pipeline(steps)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

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

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """One script call on its own (redis-py loads the script and retries on NOSCRIPT: nothing ran)."""
        assert one_slot(keys), f"{name} touches keys of several slots: {keys}"
        return await self._deadline(self._scripts[name](keys=keys, args=args))

    async def _load_all_scripts(self) -> None:
        """SCRIPT LOAD every script (on a Redis Cluster, redis-py sends it to every primary)."""
        await self._deadline(asyncio.gather(*(self.redis.script_load(s.script) for s in self._scripts.values())))

    async def _deadline(self, awaitable: Awaitable[T]) -> T:
        """Every await on Redis has a deadline, whatever the client's own settings."""
        async with asyncio.timeout(self.timeout):
            return await awaitable

    async def _warn_on_eviction(self) -> None:
        try:
            found = await self._deadline(self.redis.config_get("maxmemory-policy"))
        except (RedisError, TimeoutError):
            return  # CONFIG may be disabled on managed Redis
        policy = found.get("maxmemory-policy") if isinstance(found, dict) else None
        if policy and text(policy) != "noeviction":
            log.warning("Redis maxmemory-policy is %r: membership keys may be evicted; "
                        "set it to 'noeviction'", text(policy))


def _change_of(write: _Write) -> Change:
    assert write.change is not None, "a job is never sent as a change"
    return write.change


def _never(room: str) -> bool:
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)
