"""Stream history through faults (docs/protocol.md): a node killed with -9 under load, a node's
Redis subscriber killed under load (with and without history), Redis restarted with its data lost.

Every test runs its own nodes; those that kill Redis connections by name, or
restart Redis, run their own redis-server too.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson

from publisher import Publisher
from tests.helpers import Client, Cluster, NodeProcess, RedisServer, deadline, metric, sync_redis, wait_until
from tests.integration.test_history import Paced, content, handshake_status, join_since, offsets, recv_n

HB = 0.5  # heartbeat of the test clusters
T = TypeVar("T")




class Follower:
    """A member of one room that reads everything and, when its node goes away, reconnects to
    another node and rejoins with `since` (what hub.js does)."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str], home: int, user: str, room: str) -> None:
        self.session, self.urls, self.node, self.user, self.room = session, urls, home, user, room
        self.client: Client | None = None
        self.epoch = ""
        self.base = 0
        self.seen: list[tuple[int, str, Any]] = []  # (offset, epoch, data) of every room message, as received
        self.other: list[dict[str, Any]] = []  # any other frame
        self.recoveries: list[dict[str, Any]] = []  # the acks of rejoins with since
        self.replayed = 0

    @property
    def last(self) -> int:
        return self.seen[-1][0] if self.seen else self.base

    async def start(self) -> None:
        self.client = await Client.open(self.session, f"{self.urls[self.node]}?user_id={self.user}")
        replay, ack = await join_since(self.client, self.room)
        assert replay == [] and ack["type"] == "ack", ack
        self.epoch, self.base = ack["data"]["epoch"], ack["data"]["offset"]

    def _take(self, frame: dict[str, Any]) -> None:
        if frame.get("room") == self.room and "offset" in frame:
            self.seen.append((frame["offset"], frame["epoch"], frame["data"]))
        else:
            self.other.append(frame)

    async def _reconnect(self) -> None:
        """Another node, in turn, until one takes the connection; then rejoin from the last offset."""
        end = deadline(15)
        gone = self.node
        while time.monotonic() < end:
            self.node = (self.node + 1) % len(self.urls)
            if self.node == gone:
                continue
            try:
                self.client = await Client.open(self.session, f"{self.urls[self.node]}?user_id={self.user}")
            except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError):
                continue  # that one is down too (or not ready): the next
            replay, ack = await join_since(self.client, self.room, {"offset": self.last, "epoch": self.epoch})
            assert ack["type"] == "ack", ack
            for frame in replay:
                self._take(frame)
            self.replayed += len(replay)
            self.recoveries.append(ack["data"])
            return
        raise AssertionError(f"{self.user} found no node to reconnect to")

    async def follow(self, top: Callable[[], int | None], timeout: float = 30.0) -> None:
        """Read (reconnecting when the node goes) until the offset `top()` arrived."""
        end = deadline(timeout)
        while True:
            goal = top()
            if goal is not None and self.last >= goal:
                return
            if time.monotonic() > end:
                raise AssertionError(f"{self.user}: reached offset {self.last}, waiting for {goal}")
            assert self.client is not None
            try:
                msg = await self.client.ws.receive(timeout=0.5)
            except TimeoutError:
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._take(orjson.loads(msg.data))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                await self.client.close()
                await self._reconnect()


def offsets_of(f: Follower) -> list[int]:
    return [o for o, _, _ in f.seen]


def gaps(f: Follower) -> str:
    """Where a follower's offsets go wrong, briefly."""
    got = offsets_of(f)
    wrong = [(i, a, b) for i, (a, b) in enumerate(zip(got, got[1:], strict=False)) if b != a + 1]
    return f"{len(got)} offsets, first breaks (index, offset, next): {wrong[:5]}"


def stream_top(url: str, prefix: str, room: str) -> int:
    with Publisher(url, key_prefix=prefix) as p:
        return int(p.history(room, since=10**9, limit=1).offset)


async def test_kill_9_under_load_every_client_sees_every_offset_once(
        redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """kill -9 of one of 3 nodes while a worker publishes ~200 messages/s to a room with members on
    all three: its clients reconnect elsewhere with since, and every client sees every offset once."""
    room, count = "load", 800
    cluster = Cluster(redis_server.url, prefix, n=3, heartbeat=HB, extra=("--history-size", "2000")).start()
    try:
        urls = [node.ws_url for node in cluster.nodes]
        followers = [Follower(session, urls, i % 3, f"k{i}", room) for i in range(6)]
        for f in followers:
            await f.start()
        base, epoch = followers[0].base, followers[0].epoch
        assert all((f.base, f.epoch) == (base, epoch) for f in followers)

        worker = Paced(lambda p, i: p.broadcast_to_room(room, {"type": "tick", "data": i}),
                       redis_server.url, prefix, count, rate=200, history_size=2000)
        final: list[int] = []
        tasks = [asyncio.create_task(f.follow(lambda: final[0] if final else None)) for f in followers]
        try:
            worker.start()
            await wait_until(lambda: all(f.last >= base + 150 for f in followers) or any(t.done() for t in tasks),
                             timeout=10, what="every client to have 150 messages")
            cluster.nodes[2].signal(signal.SIGKILL)
            killed_at = worker.sent
            await worker.finish()
            final.append(stream_top(redis_server.url, prefix, room))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert final[0] == base + count
        assert killed_at < count - 100, "the kill came too late to be under load"
        for f in followers:
            assert offsets_of(f) == list(range(base + 1, base + count + 1)), (f.user, gaps(f))
            assert [d for _, _, d in f.seen] == list(range(count)), f.user
            assert {e for _, e, _ in f.seen} == {epoch}, f.user
            assert f.other == [], (f.user, f.other[:3])
        await asyncio.gather(*(f.client.expect_silence() for f in followers if f.client is not None))
        moved = [f for f in followers if f.recoveries]
        assert {f.user for f in moved} == {"k2", "k5"}  # exactly the killed node's clients moved
        for f in moved:
            assert all(ack["recovered"] is True and ack["epoch"] == epoch for ack in f.recoveries), f.recoveries
        print(f"\n[history] kill -9 at message {killed_at}/{count}: "
              f"{', '.join(f'{f.user} replayed {f.replayed}' for f in moved)}")
    finally:
        cluster.stop()


def subscriber_id(r: Any, node_id: str) -> int | None:
    """The Redis client id of node `node_id`'s subscriber connection (named hubnode:<id>:sub)."""
    for client in r.client_list():
        if client.get("name") == f"hubnode:{node_id}:sub":
            return int(client["id"])
    return None


async def test_subscriber_killed_under_load_loses_nothing_and_sends_no_resync(
        own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """CLIENT KILL ID of a node's subscriber during steady traffic to a room and a user: its
    clients (and the other node's) see every offset of both streams exactly once, and no resync."""
    room, count, user_count = "steady", 600, 150
    cluster = Cluster(own_redis.url, "hub:", n=2, heartbeat=HB, extra=("--history-size", "2000")).start()
    r = sync_redis(own_redis.url)
    try:
        clients = [await Client.open(session, f"{cluster.nodes[i].ws_url}?user_id=s{n}")
                   for n, i in enumerate((0, 0, 1))]
        room_base = []
        for client in clients:
            _, ack = await join_since(client, room)
            room_base.append(ack["data"])
        epoch, base = room_base[0]["epoch"], room_base[0]["offset"]
        user_epoch, user_base = clients[0].connected["epoch"], clients[0].connected["offset"]
        old = await wait_until(lambda: subscriber_id(r, "n1"), timeout=5, what="n1's subscriber in CLIENT LIST")

        to_room = Paced(lambda p, i: p.broadcast_to_room(room, {"type": "tick", "data": i}),
                        own_redis.url, "hub:", count, rate=200)
        to_user = Paced(lambda p, i: p.broadcast_to_user("s0", {"type": "note", "data": i}),
                        own_redis.url, "hub:", user_count, rate=50)
        got: list[list[dict[str, Any]]] = [[], [], []]
        done = asyncio.Event()

        async def read(i: int) -> None:
            while not done.is_set():
                try:
                    got[i].append(await clients[i].recv(timeout=0.5))
                except TimeoutError:
                    continue

        readers = [asyncio.create_task(read(i)) for i in range(3)]
        try:
            to_room.start()
            to_user.start()
            await wait_until(lambda: to_room.sent >= 150, timeout=10, what="steady traffic")
            killed_at = to_room.sent
            assert r.execute_command("CLIENT", "KILL", "ID", old) == 1
            await wait_until(lambda: subscriber_id(r, "n1") not in (None, old), timeout=10,
                             what="n1 to reconnect its subscriber")
            await to_room.finish()
            await to_user.finish()

            def complete() -> bool:
                room_ok = all(any(f.get("offset") == base + count and f.get("room") == room for f in g) for g in got)
                return room_ok and any(f.get("offset") == user_base + user_count and f["type"] == "note"
                                       for f in got[0])

            await wait_until(complete, timeout=15, what="every client to get the last offsets")
        finally:
            done.set()
            await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(client.expect_silence() for client in clients))  # and nothing after them
        assert killed_at < count - 100, "the kill came too late to be under load"
        for i, frames in enumerate(got):
            room_frames = [f for f in frames if f.get("room") == room]
            others = [f for f in frames if f.get("room") != room and f["type"] != "note"]
            assert offsets(room_frames) == list(range(base + 1, base + count + 1)), i
            assert [content(f) for f in room_frames] == list(range(count))
            assert {f["epoch"] for f in room_frames} == {epoch}
            assert others == [], (i, others[:3])  # no resync, nothing else
        notes = [f for f in got[0] if f["type"] == "note"]
        assert offsets(notes) == list(range(user_base + 1, user_base + user_count + 1))
        assert {f["epoch"] for f in notes} == {user_epoch}
        assert await metric(session, cluster.nodes[0].url, "hubnode_redis_reconnects_total") >= 1
        print(f"\n[history] subscriber killed at message {killed_at}/{count}; node n1 recovered "
              f"{await recovered_messages(session, cluster.nodes[0].url)} messages from history")
    finally:
        cluster.stop()


async def recovered_messages(session: aiohttp.ClientSession, url: str) -> str:
    """For the log line only: the node's count of messages delivered from history, if it has one."""
    try:
        return f"{await metric(session, url, 'hubnode_history_recovered_messages_total'):.0f}"
    except AssertionError:
        return "?"


async def test_subscriber_killed_without_history_sends_resync(
        own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """With history off, the same kill gives every client resync (as without history)."""
    cluster = Cluster(own_redis.url, "hub:", n=1, heartbeat=HB).start()
    r = sync_redis(own_redis.url)
    try:
        a = await Client.open(session, f"{cluster.nodes[0].ws_url}?user_id=off-a")
        assert not {"offset", "epoch", "recovered"} & set(a.connected)
        replay, ack = await join_since(a, "quiet")
        assert replay == [] and ack == {"type": "ack", "id": "j"}  # no position: no history
        old = await wait_until(lambda: subscriber_id(r, "n1"), timeout=5, what="n1's subscriber")
        assert r.execute_command("CLIENT", "KILL", "ID", old) == 1
        frame = await a.recv(timeout=10)
        assert (frame["type"], frame["data"]) == ("system_message", {"event": "resync"})
        assert subscriber_id(r, "n1") not in (None, old)
        with Publisher(own_redis.url) as p:
            p.broadcast_to_room("quiet", {"type": "after", "data": 1})
        frame = await a.recv()
        assert (frame["type"], frame["data"]) == ("after", 1) and "offset" not in frame
    finally:
        cluster.stop()


async def retrying(attempt: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """What a client does after a 503 or an `unavailable`: try again, within a deadline."""
    async def once() -> tuple[T] | None:
        try:
            return (await attempt(),)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 503:
                raise
        except Unavailable:
            pass
        return None

    done: tuple[T] = await wait_until(once, timeout=timeout, interval=0.05, what="the node to take the client")
    return done[0]


class Unavailable(Exception):
    """A join answered `unavailable` (it took no effect)."""


async def joined(client: Client, room: str, since: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    replay, answer = await join_since(client, room, since)
    if answer["type"] == "error" and answer["data"]["code"] == "unavailable":
        raise Unavailable(answer)
    assert answer["type"] == "ack", answer
    return replay, answer


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/readyz") as resp:
        return resp.status == 200


async def recv_until_type_count(client: Client, mtype: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next `n` frames of `mtype`, passing over others (e.g. a second resync, one per lost stream)."""
    end = deadline(timeout)
    frames: list[dict[str, Any]] = []
    while len(frames) < n:
        frame = await client.recv(max(0.01, end - time.monotonic()))
        if frame["type"] == mtype:
            frames.append(frame)
        else:
            assert frame["type"] == "system_message" and frame["data"] == {"event": "resync"}, frame
    return frames


async def test_redis_data_loss_gives_a_new_epoch(own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """Redis restarted without persistence: a reconnecting client gets recovered false and a new
    epoch for its room and its user stream, and offsets start again at 1; a client that stayed
    connected is told to resync (its stream could not be recovered) and continues in the new epoch."""
    cluster = Cluster(own_redis.url, "hub:", n=2, heartbeat=HB, extra=("--history-size", "100")).start()
    r = sync_redis(own_redis.url)
    try:
        a = await Client.open(session, f"{cluster.nodes[0].ws_url}?user_id=ep-a")
        b = await Client.open(session, f"{cluster.nodes[1].ws_url}?user_id=ep-b")
        _, ack = await join_since(a, "ep")
        old_epoch = ack["data"]["epoch"]
        await join_since(b, "ep")
        user_epoch = a.connected["epoch"]
        with Publisher(own_redis.url) as p:
            for i in range(5):
                p.broadcast_to_room("ep", {"type": "old", "data": i})
            p.broadcast_to_user("ep-a", {"type": "old-user", "data": 0})
        before = await recv_n(a, 6)
        assert offsets(before) == [1, 2, 3, 4, 5, 1] and before[0]["epoch"] == old_epoch
        await recv_n(b, 5)
        await a.close()

        own_redis.restart()
        assert r.dbsize() == 0  # the data is gone
        resync = await b.recv_type("system_message", timeout=15)
        assert resync["data"] == {"event": "resync"}
        await wait_until(lambda: sorted(r.zrange("hub:nodes", 0, -1)) == ["n1", "n2"], timeout=10,
                         what="both nodes registered again")
        await wait_until(lambda: ready(session, cluster.nodes[0].url), timeout=10, what="n1 ready again")

        # as a browser would, the client tries again while the node answers 503 / unavailable (see
        # test_history_reads_survive_a_broken_pooled_connection: right after a restart it may)
        url = f"{cluster.nodes[0].ws_url}?user_id=ep-a&since=1:{user_epoch}"
        a2 = await retrying(lambda: Client.open(session, url))
        assert a2.connected["recovered"] is False and a2.connected["offset"] == 0
        assert a2.connected["epoch"] not in (None, user_epoch)
        replay, ack = await retrying(lambda: joined(a2, "ep", {"offset": 5, "epoch": old_epoch}))
        assert replay == []
        assert ack["data"]["recovered"] is False and ack["data"]["offset"] == 0
        new_epoch = ack["data"]["epoch"]
        assert isinstance(new_epoch, str) and new_epoch != old_epoch
        with Publisher(own_redis.url) as p:
            for i in range(3):
                p.broadcast_to_room("ep", {"type": "new", "data": i})
        for client in (a2, b):
            frames = await recv_until_type_count(client, "new", 3)
            assert [(f["offset"], f["epoch"], f["data"]) for f in frames] == [
                (1, new_epoch, 0), (2, new_epoch, 1), (3, new_epoch, 2)]
    finally:
        cluster.stop()


async def test_history_reads_survive_a_broken_pooled_connection(
        own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """Redis up, /readyz 200, but the node's pooled command connection was cut (as by a Redis restart,
    CLIENT KILL, an idle timeout or a failover): a connect and a join that read a stream still succeed."""
    node = NodeProcess("--redis-url", own_redis.url, "--node-id", "pool1", "--heartbeat", "5",
                       "--history-size", "10").start()
    r = sync_redis(own_redis.url)

    def cut() -> int:
        """Kill the node's idle command connections (named hubnode:pool1:pub); how many there were."""
        ids = [c["id"] for c in r.client_list() if c.get("name") == "hubnode:pool1:pub"]
        for cid in ids:
            r.execute_command("CLIENT", "KILL", "ID", cid)
        return len(ids)

    try:
        a = await Client.open(session, f"{node.ws_url}?user_id=pool-a")  # the pool now holds a connection
        assert cut() >= 1
        assert await ready(session, node.url)
        status = await handshake_status(session, f"{node.ws_url}?user_id=pool-b")
        assert status == 101, f"connect got {status} with Redis up and /readyz 200"
        assert (await a.request("join_room", "pool-room", fid="j1"))["type"] == "ack"
        assert cut() >= 1
        assert await ready(session, node.url)
        answer = await a.request("join_room", {"room": "pool-room", "since": {"offset": 0, "epoch": "e"}}, fid="j2")
        assert answer["type"] == "ack", f"join got {answer} with Redis up and /readyz 200"
    finally:
        node.stop()


async def test_subscriber_killed_with_history_resyncs_only_presence_rooms(
        own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """With history on, a lost subscriber recovers the streams, but presence events are never stored: members
    of a room that announces them get resync (they may have missed a join or a leave), the others do not."""
    node = NodeProcess("--redis-url", own_redis.url, "--node-id", "n1", "--heartbeat", str(HB),
                       "--history-size", "100", "--presence-rooms", "live-*").start()
    r = sync_redis(own_redis.url)
    try:
        watching = await Client.open(session, f"{node.ws_url}?user_id=watching")
        quiet = await Client.open(session, f"{node.ws_url}?user_id=quiet")
        await join_since(watching, "live-1")
        await join_since(quiet, "plain")
        old = await wait_until(lambda: subscriber_id(r, "n1"), timeout=5, what="n1's subscriber")
        assert r.execute_command("CLIENT", "KILL", "ID", old) == 1
        frame = await watching.recv_type("system_message", timeout=10)
        assert frame["data"] == {"event": "resync"}
        await wait_until(lambda: subscriber_id(r, "n1") not in (None, old), timeout=10, what="a new subscriber")
        with Publisher(own_redis.url) as p:  # a marker: a resync for `quiet` would come before it
            p.broadcast_to_room("plain", {"type": "after", "data": 1})
        seen = [await quiet.recv(timeout=10)]
        while seen[-1]["type"] != "after":
            seen.append(await quiet.recv(timeout=10))
        assert [f["type"] for f in seen] == ["after"], seen
    finally:
        node.stop()
