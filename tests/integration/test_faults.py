"""Faults, tested rather than hoped for: node crash and pause, Redis restart, killed,
black-holed and overflowing subscriber connections (docs/redis.md)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import aiohttp
import msgpack

from publisher.keys import Keys
from tests.helpers import (
    SCALE,
    Client,
    Cluster,
    RedisServer,
    deadline,
    free_port,
    membership_of,
    metric,
    redis_state,
    sync_redis,
    wait_until,
)

HB = 0.5  # heartbeat of the test clusters




async def connect(session: aiohttp.ClientSession, cluster: Cluster, i: int, user: str) -> Client:
    return await Client.open(session, f"{cluster.nodes[i].ws_url}?user_id={user}")


async def pair_in_room(session: aiohttp.ClientSession, cluster: Cluster, tag: str) -> tuple[Client, Client]:
    """Client `<tag>a` on node 1 and `<tag>b` on node 2, both in "room"."""
    a = await connect(session, cluster, 0, f"{tag}a")
    b = await connect(session, cluster, 1, f"{tag}b")
    await a.join("room")
    await b.join("room")
    return a, b


BATCH = 20  # messages that must all arrive, exactly once and in order, once delivery is back


def say(room: str, text: str) -> dict[str, object]:
    return {"type": "room_message", "data": {"room": room, "message": text}}


def view(frame: dict[str, Any]) -> tuple[str, object]:
    """A frame as (type, message) for a room message, else (type, data): short enough to print."""
    data = frame.get("data")
    return (frame["type"], data.get("message") if isinstance(data, dict) else data)


async def delivery_resumed(sender: Client, receiver: Client, room: str, marker: str, timeout: float = 15.0) -> None:
    """Readiness: probes are sent until one reaches `receiver`, within a deadline.

    Delivery is at most once, so a probe published while a subscriber was
    being replaced may be lost (that is what resync announces). Earlier probes
    and frames from before the recovery are passed over; once the latest probe
    arrived, ordering means no earlier one can follow it.
    """
    end = deadline(timeout)
    sent = 0
    while time.monotonic() < end:
        tag = f"{marker}-probe-{sent}"
        sent += 1
        await sender.send(say(room, tag))
        with contextlib.suppress(TimeoutError):
            while view(await receiver.recv(timeout=1.0)) != ("room_message", tag):
                pass
            return
    raise AssertionError(f"none of {sent} probes reached the receiver within {timeout * SCALE:.1f}s")


async def chat_works(sender: Client, receiver: Client, room: str, marker: str, count: int = BATCH) -> None:
    """Delivery is whole again: after a probe got through, `count` room messages arrive exactly.

    Each of them arrives once, in the order sent, and nothing else reaches the
    receiver: not a duplicate, not a late resync, not a stray frame.
    """
    await delivery_resumed(sender, receiver, room, marker)
    sent = [f"{marker}-{i}" for i in range(count)]
    for tag in sent:
        await sender.send(say(room, tag))
    got: list[tuple[str, object]] = []
    try:
        while len(got) < count:
            got.append(view(await receiver.recv(timeout=5.0)))
    except TimeoutError:
        raise AssertionError(f"only {len(got)} of {count} frames arrived after recovery: {got}") from None
    assert got == [("room_message", tag) for tag in sent]
    await receiver.expect_silence()  # and no duplicate of the last one


def envelope(msg: dict[str, object]) -> bytes:
    return msgpack.packb({"v": 1, "id": str(time.time_ns()), "origin": "pub:t", "msg": msg})


async def test_killed_node_is_swept_and_survivors_deliver(redis_server: RedisServer,
                                                          session: aiohttp.ClientSession) -> None:
    """kill -9 of a node: its entries are gone within 4 heartbeats; the others keep delivering."""
    prefix = "kill:"
    cluster = Cluster(redis_server.url, prefix, n=3, heartbeat=HB).start()
    r = sync_redis(redis_server.url)
    try:
        clients = [await connect(session, cluster, i, f"k{i}") for i in range(3)]
        for client in clients:
            await client.join("room")
        killed_at = time.monotonic()
        cluster.nodes[2].signal(signal.SIGKILL)

        def gone() -> bool:
            state = redis_state(r, prefix)
            members = membership_of(state, prefix).get("room", {})
            return ("n3" not in state.get(f"{prefix}nodes", []) and Keys(prefix).node("n3") not in state
                    and not any(c.startswith("n3:") for c in members) and r.hlen(Keys(prefix).online("k2")) == 0)

        await wait_until(gone, timeout=4 * HB + 1.5, what="the dead node to be swept")
        print(f"\n[fault] kill -9: entries swept after {time.monotonic() - killed_at:.2f}s (heartbeat {HB}s)")
        assert r.hlen(f"{prefix}members:{{room}}") == 2
        await chat_works(clients[0], clients[1], "room", "after-kill")
    finally:
        cluster.stop()


async def test_paused_node_reregisters_after_sweep(redis_server: RedisServer,
                                                   session: aiohttp.ClientSession) -> None:
    """SIGSTOP past expiry gets a node swept; after SIGCONT it re-registers its members."""
    prefix = "pause-node:"
    cluster = Cluster(redis_server.url, prefix, n=2, heartbeat=HB).start()
    r = sync_redis(redis_server.url)
    try:
        a, b = await pair_in_room(session, cluster, "p")
        cluster.nodes[1].signal(signal.SIGSTOP)
        await wait_until(lambda: b.conn_id not in r.hkeys(f"{prefix}members:{{room}}"),
                         timeout=4 * HB + 1.5, what="paused node swept")
        resumed = time.monotonic()
        cluster.nodes[1].signal(signal.SIGCONT)
        await wait_until(lambda: b.conn_id in r.hkeys(f"{prefix}members:{{room}}")
                         and r.hlen(Keys(prefix).online("pb")) == 1
                         and "n2" in r.zrange(f"{prefix}nodes", 0, -1), timeout=5, what="re-registration")
        print(f"\n[fault] SIGSTOP/SIGCONT: re-registered {time.monotonic() - resumed:.2f}s after SIGCONT")
        assert r.hlen(f"{prefix}members:{{room}}") == 2
        await chat_works(a, b, "room", "after-pause")
        # one probe-driven reconnect after the pause, not a storm of them
        assert 1 <= await metric(session, cluster.nodes[1].url, "hubnode_redis_reconnects_total") <= 2
    finally:
        with contextlib.suppress(Exception):
            cluster.nodes[1].signal(signal.SIGCONT)
        cluster.stop()


async def test_redis_restart_resubscribes_reregisters_and_resyncs(own_redis: RedisServer,
                                                                  session: aiohttp.ClientSession) -> None:
    """After redis-server restarts (data lost), nodes resubscribe, re-register, send resync, deliver."""
    prefix = "hub:"
    cluster = Cluster(own_redis.url, prefix, n=2, heartbeat=HB).start()
    r = sync_redis(own_redis.url)
    try:
        a, b = await pair_in_room(session, cluster, "r")
        restarted = time.monotonic()
        own_redis.restart()
        assert redis_state(r, prefix) == {}
        for client in (a, b):
            msg = await client.recv_type("system_message", timeout=15)
            assert msg["data"] == {"event": "resync"}
        await wait_until(lambda: len(r.hkeys(f"{prefix}members:{{room}}")) == 2
                         and r.sismember(Keys(prefix).node_rooms("n1"), "room")
                         and sorted(r.zrange(f"{prefix}nodes", 0, -1)) == ["n1", "n2"], timeout=10,
                         what="re-registration after restart")
        print(f"\n[fault] Redis restart: resubscribed+re-registered {time.monotonic() - restarted:.2f}s after")
        await chat_works(a, b, "room", "after-restart")
        assert await metric(session, cluster.nodes[0].url, "hubnode_redis_reconnects_total") >= 1
    finally:
        cluster.stop()


async def test_client_kill_pubsub_recovers(own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """CLIENT KILL TYPE pubsub: every node reconnects, resubscribes and sends resync."""
    cluster = Cluster(own_redis.url, "hub:", n=2, heartbeat=HB).start()
    r = sync_redis(own_redis.url)
    try:
        a, b = await pair_in_room(session, cluster, "c")
        killed = time.monotonic()
        assert r.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
        for client in (a, b):
            assert (await client.recv_type("system_message", timeout=10))["data"] == {"event": "resync"}
        print(f"\n[fault] CLIENT KILL TYPE pubsub: resync after {time.monotonic() - killed:.2f}s")
        await chat_works(b, a, "room", "after-client-kill")
    finally:
        cluster.stop()


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/readyz") as resp:
        return resp.status == 200


class BlackholeProxy:
    """A TCP proxy to Redis that can stop forwarding on its open connections (a half-open link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.links: list[dict[str, bool]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def blackhole(self) -> None:
        """Every connection open now stops forwarding, in both directions, without closing."""
        for link in self.links:
            link["dead"] = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.append(up_writer)
        link = {"dead": False}
        self.links.append(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, link))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: dict[str, bool]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not link["dead"]:
                    dst.write(data)
                    await dst.drain()
        with contextlib.suppress(Exception):
            dst.close()

    async def close(self) -> None:
        """Stop listening, stop the pipes and close both ends of every link (a black-holed pipe never ends)."""
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()


async def test_blackholed_subscriber_found_by_probe(own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """A subscriber link that silently stops forwarding is found by the probe and replaced."""
    proxy = BlackholeProxy(own_redis.port)
    await proxy.start()
    via_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    cluster = Cluster(via_proxy, "hub:", n=1, heartbeat=HB).start()
    helper = Cluster(own_redis.url, "hub:", n=1, heartbeat=HB)
    helper.nodes[0].args = tuple(a if a != "n1" else "n2" for a in helper.nodes[0].args)
    helper.start()
    try:
        # the proxy runs on this test's loop, so readiness is awaited here, not in start(); so is the
        # registration, which the node retries on its heartbeat: unregistered, it refuses users (503)
        await wait_until(lambda: _ready(session, cluster.nodes[0].url), timeout=10, what="node via proxy ready")
        r = sync_redis(own_redis.url)
        await wait_until(lambda: "n1" in r.zrange("hub:nodes", 0, -1), timeout=10, what="node via proxy registered")
        a = await connect(session, cluster, 0, "ba")
        b = await Client.open(session, f"{helper.nodes[0].ws_url}?user_id=bb")
        await a.join("room")
        await b.join("room")
        holed = time.monotonic()
        proxy.blackhole()
        assert (await a.recv_type("system_message", timeout=15))["data"] == {"event": "resync"}
        print(f"\n[fault] black-holed subscriber: probe recovered after {time.monotonic() - holed:.2f}s")
        assert await metric(session, cluster.nodes[0].url, "hubnode_redis_probe_failures_total") >= 1
        await chat_works(b, a, "room", "after-blackhole")
    finally:
        cluster.stop()
        helper.stop()
        await proxy.close()


async def test_output_buffer_limit_cut_recovers(own_redis: RedisServer, session: aiohttp.ClientSession) -> None:
    """Redis cutting a paused node's subscriber (client-output-buffer-limit) is recovered and counted."""
    r = sync_redis(own_redis.url)
    r.config_set("client-output-buffer-limit", "pubsub 262144 131072 1")
    cluster = Cluster(own_redis.url, "hub:", n=2, heartbeat=HB).start()
    try:
        a, b = await pair_in_room(session, cluster, "o")
        cluster.nodes[0].signal(signal.SIGSTOP)  # its loop (the whole process) is blocked
        blob = "x" * 10_000
        subscribers = len(r.client_list(_type="pubsub"))
        assert subscribers == 2

        def cut() -> bool:  # the paused node cannot reconnect, so one subscriber fewer means the cut
            return len(r.client_list(_type="pubsub")) < subscribers

        for i in range(5000):  # up to 50 MB: past the kernel's socket buffers, then past the limit
            r.publish("hub:room:{room}", envelope({"type": "bulk", "data": {"i": i, "blob": blob}}))
            if i % 100 == 99 and cut():
                break
        assert cut(), "Redis did not cut the paused subscriber"
        resumed = time.monotonic()
        cluster.nodes[0].signal(signal.SIGCONT)
        while (await a.recv(timeout=15))["type"] != "system_message":
            pass  # whatever reached the socket before the cut is delivered first
        print(f"\n[fault] output-buffer cut: resync {time.monotonic() - resumed:.2f}s after SIGCONT")
        assert await metric(session, cluster.nodes[0].url, "hubnode_redis_reconnects_total") >= 1
        await chat_works(b, a, "room", "after-cut")
    finally:
        with contextlib.suppress(Exception):
            cluster.nodes[0].signal(signal.SIGCONT)
        cluster.stop()
