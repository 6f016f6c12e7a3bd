"""A busy room through Redis topology changes (docs/protocol.md): a Redis Cluster primary
killed and replaced by its replica, the room's slot migrated to another primary during traffic, and a
Sentinel-managed primary killed and replaced.

Each test runs its own Redis (`own_redis_cluster`, `redis_sentinel`) and two nodes with history on; a
worker publishes a counter to the room every 20 ms throughout, and every member's frames are recorded
with the time they arrived. Kill-to-first-delivery times are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import redis

from deploy.redis_servers import RedisClusterProcs, SentinelProcs, key_slot
from publisher import Publisher, core
from publisher.keys import Keys
from publisher.targets import Target
from tests.helpers import Client, Cluster, RedisServer, metric, sync_redis, wait_until
from tests.integration.test_history import join_since
from tests.integration.test_redis_cluster import names_on_shards, owner

HB = 0.5  # heartbeat of the test nodes
HISTORY = ("--history-size", "1000")
INTERVAL = 0.02  # the worker's pace: 50 messages a second


class Steady(threading.Thread):
    """A worker thread that publishes `tick` 0, 1, 2… to `room` every 20 ms until stopped.

    A publish that fails (the slot has no reachable primary for a while) is
    tried again for the same counter, so the counters that got through have
    no gap: what a careful worker does. It resends the very same envelope
    until it goes through (the history script stores an envelope id once, and
    nodes drop an id they delivered), so a reply lost at the kill cannot make
    a duplicate that the members' counters would show.
    """

    def __init__(self, url: str, prefix: str, room: str) -> None:
        super().__init__(daemon=True)
        self.url, self.prefix, self.room = url, prefix, room
        self.began_at: list[float] = []  # when the publish that got each counter through began (monotonic)
        self.done_at: list[float] = []  # and when it returned
        self.errors: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._stop_now = threading.Event()

    @property
    def sent(self) -> int:
        return len(self.done_at)

    def run(self) -> None:
        try:
            with Publisher(self.url, key_prefix=self.prefix, history_size=1000, retries=2, timeout=1.0) as pub:
                outgoing: core.Outgoing | None = None
                due = time.monotonic()
                while not self._stop_now.is_set():
                    began = time.monotonic()
                    try:
                        # one envelope per counter, however often it is sent: the history script
                        # stores an envelope id once, so a resend after a lost reply is no duplicate
                        if outgoing is None:
                            outgoing = core.prepare(Target("room", self.room), {"type": "tick", "data": self.sent},
                                                    pub.origin, pub.keys)
                        sharded = pub._is_sharded()
                        pub._run(core.publish_query([outgoing], pub.keys, pub.history_policy, sharded=sharded))
                        outgoing = None
                    except redis.RedisError as exc:
                        self.errors[type(exc).__name__] += 1
                        self._stop_now.wait(INTERVAL)  # the pace, not a synchronisation
                        continue
                    self.began_at.append(began)
                    self.done_at.append(time.monotonic())
                    due += INTERVAL
                    self._stop_now.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def first_after(self, moment: float) -> int | None:
        """The first counter whose (successful) publish began after `moment`, if any yet."""
        return next((i for i, t in enumerate(self.began_at) if t > moment), None)

    async def finish(self) -> int:
        """Stop and return how many counters were published."""
        self._stop_now.set()
        await wait_until(lambda: not self.is_alive(), timeout=10, what="the worker thread to stop")
        if self.error is not None:
            raise AssertionError(f"the worker failed after {self.sent} messages: {self.error!r}")
        return self.sent


class Member:
    """A client in the room whose every frame is recorded, with the time it arrived."""

    def __init__(self, client: Client, room: str, ack: dict[str, Any]) -> None:
        self.client, self.room = client, room
        self.epoch, self.base = ack["data"]["epoch"], ack["data"]["offset"]
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.client.ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return
            self.frames.append((time.monotonic(), orjson.loads(msg.data)))

    @property
    def ticks(self) -> list[dict[str, Any]]:
        return [f for _, f in self.frames if f["type"] == "tick"]

    @property
    def others(self) -> list[dict[str, Any]]:
        return [f for _, f in self.frames if f["type"] != "tick"]

    def has(self, counter: int) -> bool:
        return any(f["data"] == counter for f in self.ticks)

    def received_at(self, counter: int) -> float:
        return next(t for t, f in self.frames if f["type"] == "tick" and f["data"] == counter)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def assert_no_gap(self, total: int) -> None:
        """Every counter once, in order, with contiguous offsets in one epoch, and nothing else."""
        ticks = self.ticks
        got = [f["data"] for f in ticks]
        missing = sorted(set(range(total)) - set(got))
        twice = sorted(c for c, n in Counter(got).items() if n > 1)
        assert got == list(range(total)), f"{self.client.conn_id}: missing {missing[:10]}, twice {twice[:10]}"
        assert [f["offset"] for f in ticks] == list(range(self.base + 1, self.base + total + 1))
        assert {f["epoch"] for f in ticks} == {self.epoch}
        assert self.others == [], self.others[:3]

    def assert_recovered_or_told(self, total: int, first_after: int) -> None:
        """As assert_no_gap, unless the promoted replica lacked the last writes of the killed primary.

        Redis replicates asynchronously: a message the old primary took (and the
        nodes delivered live) may be missing on its replica, and then the
        stream cannot vouch for what a member has; the node says so with one
        `resync`. Even then nothing is delivered twice, and every message
        published after the fault reaches the member, in order.
        """
        if not any(f["type"] == "system_message" for f in self.others):
            self.assert_no_gap(total)
            return
        assert self.others == [{"type": "system_message", "data": {"event": "resync"}}], self.others[:3]
        got = [f["data"] for f in self.ticks]
        assert len(got) == len(set(got)), f"{self.client.conn_id}: a message came twice"
        after = [c for c in got if c >= first_after]
        assert after == list(range(first_after, total)), f"{self.client.conn_id}: lost after the fault"


async def members_in(session: aiohttp.ClientSession, nodes: Cluster, room: str, tag: str) -> list[Member]:
    """Two members of `room` on each node, joined with positions (so recovery is tracked)."""
    members = []
    for i in range(4):
        client = await Client.open(session, f"{nodes.nodes[i % 2].ws_url}?user_id={tag}-{i}")
        replay, ack = await join_since(client, room)
        assert replay == [] and ack["type"] == "ack", ack
        members.append(Member(client, room, ack))
    return members


async def room_lists_exactly(session: aiohttp.ClientSession, nodes: Cluster, room: str,
                             members: list[Member]) -> bool:
    """/api/rooms/<room> on every node lists exactly the members' connections."""
    want = sorted(m.client.conn_id for m in members)
    for node in nodes.nodes:
        async with session.get(f"{node.url}/api/rooms/{room}") as resp:
            if resp.status != 200 or sorted(m["conn_id"] for m in (await resp.json())["members"]) != want:
                return False
    return True


async def every_message_and_member(session: aiohttp.ClientSession, nodes: Cluster, room: str,
                                   members: list[Member], total: int, first_after: int) -> None:
    """After a primary was killed: every member got every message (or one resync, see
    Member.assert_recovered_or_told), and /api/rooms/<room> lists exactly the members again."""
    for m in members:
        m.assert_recovered_or_told(total, first_after)
    await wait_until(lambda: room_lists_exactly(session, nodes, room, members), timeout=10,
                     what="/api/rooms/<room> to list exactly the members")


async def traffic_through(change: Callable[[], float], url: str, prefix: str, room: str, members: list[Member],
                          what: str) -> tuple[int, float, int]:
    """Run the worker; after 25 messages apply `change` (blocking, so in a thread; it returns the moment
    of the fault itself), keep publishing until 100 messages began after that moment and got through,
    then stop and wait until every member has the last one.

    Returns (messages published, seconds from the fault to a member receiving the first message
    published after it, that message's counter).
    """
    worker = Steady(url, prefix, room)
    worker.start()
    try:
        await wait_until(lambda: all(m.has(25) for m in members), timeout=10, what="steady traffic")
        began = time.monotonic()
        fault = await asyncio.to_thread(change)
        settled = time.monotonic() - fault

        def enough() -> bool:
            first = worker.first_after(fault)
            return (first is not None and worker.sent - first >= 100) or not worker.is_alive()

        await wait_until(enough, timeout=30, what=f"100 messages published after the {what}")
    finally:
        total = await worker.finish()
    await wait_until(lambda: all(m.has(total - 1) for m in members), timeout=15,
                     what=f"every member to receive the last message after the {what}")
    first = worker.first_after(fault)
    assert first is not None
    arrivals = [m.received_at(first) - fault for m in members]
    print(f"\n[{what}] the fault came {fault - began:.2f}s into the change, Redis settled {settled:.2f}s after "
          f"it; {total} messages, publish errors {dict(worker.errors)}; message {first}, the first sent after "
          f"the fault, got through after {worker.done_at[first] - fault:.2f}s, reached a member after "
          f"{min(arrivals):.2f}s and every member after {max(arrivals):.2f}s")
    return total, min(arrivals), first


async def test_cluster_primary_killed_replica_takes_over_no_gap(
        own_redis_cluster: RedisClusterProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """SIGKILL of the primary that owns a busy room's slot: its replica takes over, both nodes follow it,
    every member receives every message exactly once in order (recovered from history: contiguous
    offsets, one epoch, no resync; or, if the replica lacked the killed primary's last writes, one resync and
    nothing twice), and /api/rooms/<room> lists exactly the connected members."""
    cluster = own_redis_cluster
    room = names_on_shards(cluster, "busy")[0]
    slot = key_slot(room.encode())
    nodes = Cluster(cluster.url, prefix, n=2, heartbeat=HB, extra=HISTORY).start()
    members: list[Member] = []
    try:
        members = await members_in(session, nodes, room, "fo")
        killed = owner(cluster, Keys(prefix).room_channel(room))
        replica = cluster.replicas_of(killed)[0]

        def fail_over() -> float:
            assert cluster.primary_of_slot(slot) is killed
            killed.kill()  # returns once the process is gone
            # Taken after the kill, not before: a publish that began in between could still be taken by
            # the primary and lost with it (replication is asynchronous), and "after the fault" must
            # mean no message could have reached the dead primary.
            moment = time.monotonic()
            assert cluster.wait_failover(slot) is replica
            return moment

        total, first, first_after = await traffic_through(fail_over, cluster.url, prefix, room, members,
                                                          "cluster primary kill")
        print(f"[cluster primary kill] {killed.name} killed, {replica.name} promoted: kill to first delivery "
              f"{first:.2f}s")
        await every_message_and_member(session, nodes, room, members, total, first_after)
    finally:
        for m in members:
            await m.stop()
        nodes.stop()


async def test_slot_migrated_during_traffic_loses_nothing(
        own_redis_cluster: RedisClusterProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """The busy room's slot (stream, members and channel) moved to another primary while a worker
    publishes: the nodes resubscribe on the new owner, every member receives every message exactly
    once in order with no resync, and the room's membership is intact on its new primary."""
    cluster = own_redis_cluster
    keys = Keys(prefix)
    room = names_on_shards(cluster, "moving")[0]
    slot, channel = key_slot(room.encode()), keys.room_channel(room)
    source = owner(cluster, channel)
    target = next(p for p in cluster.primaries() if p is not source)
    nodes = Cluster(cluster.url, prefix, n=2, heartbeat=HB, extra=HISTORY).start()
    members: list[Member] = []
    try:
        members = await members_in(session, nodes, room, "mig")

        def migrate() -> float:
            cluster.migrate_slot(slot, target)
            return time.monotonic()  # from here on the source refuses the slot: the nodes must have moved

        total, _, _ = await traffic_through(migrate, cluster.url, prefix, room, members, "slot migration")
        assert owner(cluster, channel) is target
        for m in members:
            m.assert_no_gap(total)
        assert target.call("HLEN", keys.members(room)) == 4
        assert source.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert await room_lists_exactly(session, nodes, room, members)
        assert target.call("PUBSUB", "SHARDNUMSUB", channel)[1] == 2, "both nodes subscribe on the new owner"
        for node in nodes.nodes:
            assert await metric(session, node.url, "hubnode_redis_reconnects_total") >= 1, node.url
    finally:
        for m in members:
            await m.stop()
        nodes.stop()


async def test_sentinel_primary_killed_nodes_follow_the_promoted_replica(
        redis_sentinel: SentinelProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """SIGKILL of the Sentinel-managed primary: the sentinels promote the replica, both nodes follow it
    (their subscriber, their publishes and their heartbeats), every member receives every message exactly
    once in order (history: no gap, no resync; or, if the replica lacked the killed primary's last writes,
    one resync and nothing twice), and /api/rooms/<room> lists exactly the members."""
    sentinel = redis_sentinel
    room = "watched"
    keys = Keys(prefix)
    nodes = Cluster(sentinel.url, prefix, n=2, heartbeat=HB, extra=HISTORY).start()
    members: list[Member] = []
    try:
        members = await members_in(session, nodes, room, "sen")
        killed = sentinel.primary

        def fail_over() -> float:
            sentinel.kill_primary()  # returns once the process is gone
            moment = time.monotonic()  # after the kill: see the cluster test
            sentinel.wait_failover()
            return moment

        killed_ms = int(time.time() * 1000)
        total, first, first_after = await traffic_through(fail_over, sentinel.url, prefix, room, members,
                                                          "sentinel primary kill")
        promoted = sentinel.primary
        assert promoted is not killed
        print(f"[sentinel primary kill] {killed.name} killed, {promoted.name} promoted: kill to first delivery "
              f"{first:.2f}s")

        def beating_on_promoted() -> bool:
            beats = [promoted.call("HGET", keys.node(n), "heartbeat_at") for n in ("n1", "n2")]
            return all(b is not None and int(b) > killed_ms for b in beats)

        await wait_until(beating_on_promoted, timeout=10, what="both nodes to heartbeat on the promoted replica")
        await every_message_and_member(session, nodes, room, members, total, first_after)
    finally:
        for m in members:
            await m.stop()
        nodes.stop()


async def test_an_entry_a_failover_brought_back_is_cleared_by_the_reconcile(
        own_redis: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """A delete lost in a failover (the promoted replica still has a member entry the node removed, in a room
    its index no longer lists) is cleared once the node's subscriber comes back: the node re-registers and
    clears its entries from the rooms and users it removed entries from lately; live members stay."""
    nodes = Cluster(own_redis.url, prefix, n=1, heartbeat=HB).start()
    r = sync_redis(own_redis.url)
    keys = Keys(prefix)
    try:
        stays = await Client.open(session, f"{nodes.nodes[0].ws_url}?user_id=stays")
        goes = await Client.open(session, f"{nodes.nodes[0].ws_url}?user_id=goes")
        await stays.join("kept")
        await goes.join("kept")
        await goes.join("gone")
        await goes.request("leave_room", "gone", fid="l")
        await wait_until(lambda: not r.sismember(keys.node_rooms("n1"), "gone"), what="the index to drop the room")
        # what a promoted replica that missed the HDEL holds: the entry, and no index naming the room
        r.hset(keys.members("gone"), goes.conn_id, "goes")
        r.client_kill_filter(_type="pubsub")
        kept = {stays.conn_id: "stays", goes.conn_id: "goes"}
        await wait_until(lambda: r.hlen(keys.members("gone")) == 0 and r.hgetall(keys.members("kept")) == kept,
                         timeout=10, what="the reconcile to clear the entry the failover brought back, and only it")
    finally:
        nodes.stop()
