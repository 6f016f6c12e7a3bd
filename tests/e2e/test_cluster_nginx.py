"""The `make cluster` topology for real: redis-server, three hubnode processes, nginx in front.

Clients (hubnode.client.HubClient) reach the nodes only through nginx (deploy/nginx.conf rendered by
deploy/cluster.py), the way a browser would. Absence is proven without
waiting: a message that must not reach a client is followed by a broadcast
marker, published after the message was acknowledged (so after Redis took
it), and a client that was not a target sees the marker first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Cluster
from hubnode.client import HubClient
from hubnode.config import Config
from tests.helpers import ROOT, SCALE, free_port, wait_until, wait_until_sync

HEARTBEAT = 0.5
NODES = {"node1", "node2", "node3"}
CLIENTS = 30


def boot() -> Cluster:
    """The cluster of `make cluster` on free ports, with quick heartbeats."""
    return Cluster(port=0, nodes=3, node_args=("--heartbeat", str(HEARTBEAT))).start(timeout=30 * SCALE)


def shutdown(cluster: Cluster, killed: tuple[str, ...] = ()) -> None:
    """Stop the cluster; fail if a process the test did not kill died, a node logged a
    traceback, or a node did not exit 0 on SIGTERM within its drain timeout (docs/protocol.md 8)."""
    dead = [p.name for p in cluster.dead() if p.name not in killed]
    started = time.monotonic()
    cluster.stop_processes(node_grace=Config.drain_timeout + 2.0)
    took = time.monotonic() - started
    live_nodes = [cluster.procs[n] for n in cluster.node_ids if n not in killed]
    crashed = [p.name for p in live_nodes if "Traceback (most recent call last)" in p.output(10**6)]
    unclean = [(p.name, p.popen.returncode) for p in live_nodes if p.popen.returncode != 0]
    logs = cluster.logs() if dead or crashed or unclean else ""
    cluster.stop()
    assert not dead, f"cluster processes died during the test: {dead}\n{logs}"
    assert not crashed, f"nodes logged a traceback: {crashed}\n{logs}"
    assert not unclean, f"nodes did not drain and exit 0 on SIGTERM (stop took {took:.1f}s): {unclean}\n{logs}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for the tests that do not break it; each uses its own rooms and users."""
    c = boot()
    yield c
    shutdown(c)


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    """A cluster of its own, for a test that kills node2."""
    c = boot()
    yield c
    shutdown(c, killed=("node2",))


class NginxClient:
    """A `hubnode.client.HubClient` through nginx, as an application would hold one, plus what the
    failover test measures: the node of each connection, when a connection dropped, when the next
    attempt began (after the client's backoff) and when the client was back in all its rooms.

    Frames that are not the client's own events are queued for `next()`.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, user: str, rooms: tuple[str, ...]) -> None:
        self.user, self.rooms = user, rooms
        # min_delay 0.25: a reconnect waits 125-250 ms first, as hub.js's tests expect
        self.hub = HubClient(url, user_id=user, session=session, min_delay=0.25, max_delay=10.0,
                             timeout=5 * SCALE, heartbeat=None, queue_size=0)
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ready = asyncio.Event()  # connected and every room joined
        self.nodes: list[str] = []  # node of each connection, in order
        self.down_at: float | None = None  # when the last connection was seen closed
        self.retry_at: float | None = None  # when the first attempt after it began (after the backoff)
        self.up_at: float | None = None  # when the client was ready again after it
        self._rejoined: set[str] = set()
        for kind in ("*", "disconnected", "recovered"):  # "*": the node's frames; the others: the client's own
            self.hub.on(kind, self._frame)

    @property
    def node(self) -> str:
        return self.nodes[-1]

    @property
    def conn_id(self) -> str:
        assert self.hub.info is not None
        return str(self.hub.info["conn_id"])

    async def start(self) -> NginxClient:
        await self.hub.connect()
        for room in self.rooms:
            await self.hub.join(room)
        self.ready.set()
        return self

    async def close(self) -> None:
        await self.hub.close()

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next queued frame (not an answer to a request, nor a client event)."""
        return await asyncio.wait_for(self.frames.get(), timeout * SCALE)

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "connected":
            self.nodes.append(str(frame["data"]["node"]))
            self._rejoined = set()
            if self.down_at is not None and not self.rooms:
                self._up()
        elif kind == "disconnected":
            self.ready.clear()
            self.down_at, self.up_at = time.monotonic(), None
            self.retry_at = self.down_at + (frame["delay"] or 0.0)
        elif kind == "recovered":  # one per room re-joined on a new connection
            self._rejoined.add(frame["room"])
            if self.down_at is not None and self._rejoined >= set(self.rooms):
                self._up()
        else:
            self.frames.put_nowait(frame)

    def _up(self) -> None:
        self.up_at = time.monotonic()
        self.ready.set()


@contextlib.asynccontextmanager
async def open_clients(session: aiohttp.ClientSession, cluster: Cluster, tag: str,
                       rooms_of: Any = lambda i: ()) -> AsyncIterator[list[NginxClient]]:
    """CLIENTS clients through nginx, two per user (`<tag>-u0` … ), opened one after the other."""
    clients: list[NginxClient] = []
    try:
        for i in range(CLIENTS):
            user = f"{tag}-u{i // 2}"
            clients.append(await NginxClient(session, cluster.ws_url, user, tuple(rooms_of(i))).start())
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def expect_each(clients: list[NginxClient], predicate: Any, what: str) -> None:
    """Every client's next frame satisfies `predicate`."""
    frames = await asyncio.gather(*(c.next() for c in clients))
    bad = [(c.user, c.node, f) for c, f in zip(clients, frames, strict=True) if not predicate(f)]
    assert not bad, f"{what}: {bad[:3]}"


async def marker(session: aiohttp.ClientSession, cluster: Cluster, n: int) -> None:
    """POST /broadcast through nginx: the marker that follows every targeted message."""
    async with session.post(cluster.url + "/broadcast", json={"type": "marker", "data": n}) as resp:
        assert resp.status == 202, await resp.text()


def is_marker(n: int) -> Any:
    return lambda f: f["type"] == "marker" and f["data"] == n


async def hubctl(cluster: Cluster, *args: str) -> Any:
    """Run the real `hubctl … --json` against the cluster's Redis; its parsed output."""
    script = Path(sys.executable).parent / "hubctl"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "publisher.cli"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--redis-url", cluster.redis_url, *args, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20 * SCALE)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def room_members(session: aiohttp.ClientSession, cluster: Cluster, room: str) -> list[dict[str, Any]]:
    async with session.get(f"{cluster.url}/api/rooms/{room}") as resp:
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["members"])


def expected_members(clients: list[NginxClient]) -> list[tuple[str, str, str]]:
    return sorted((c.conn_id, c.user, c.node) for c in clients)


def as_rows(members: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((m["conn_id"], m["user_id"], m["node"]) for m in members)


async def test_clients_through_nginx_reach_every_node(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """nginx spreads 30 WebSocket clients over all three nodes (least_conn: evenly)."""
    async def no_clients() -> bool:  # earlier tests' connections are gone, so the counts start equal
        async with session.get(cluster.url + "/api/stats") as resp:
            return bool((await resp.json())["clients"] == 0)

    await wait_until(no_clients, 5, what="no connections left from earlier tests")
    async with open_clients(session, cluster, "spread") as clients:
        spread = Counter(c.node for c in clients)
        print(f"clients per node through nginx: {dict(sorted(spread.items()))}")
        assert set(spread) == NODES
        assert max(spread.values()) - min(spread.values()) <= 1, spread


async def test_room_user_and_broadcast_messages_cross_nodes(
        cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Room, private and broadcast messages from a client on one node reach exactly their targets on all nodes."""
    async with open_clients(session, cluster, "msg", lambda i: ("lobby",) + (("evens",) if i % 2 == 0 else ())
                            ) as clients:
        evens = [c for i, c in enumerate(clients) if i % 2 == 0]
        assert {c.node for c in evens} == NODES
        sender = clients[0]

        # room message to every member of "lobby", on every node
        assert (await sender.hub.send_to_room("lobby", "hello lobby"))["type"] == "ack"
        await expect_each(clients, lambda f: f["type"] == "room_message" and f["room"] == "lobby"
                          and f["data"]["message"] == "hello lobby" and f["user_id"] == sender.user,
                          "room message to lobby")

        # room message to "evens" only: the odd clients see the marker first
        sender = next(c for c in evens if c.node != clients[0].node)
        assert (await sender.hub.send_to_room("evens", "hi"))["type"] == "ack"
        await marker(session, cluster, 1)
        await expect_each(evens, lambda f: f["type"] == "room_message" and f["room"] == "evens", "evens message")
        await expect_each(clients, is_marker(1), "marker after the evens message")

        # private message to a user with connections on two nodes, from a third node
        by_user: dict[str, list[NginxClient]] = {}
        for c in clients:
            by_user.setdefault(c.user, []).append(c)
        target_user, targets = next((u, cs) for u, cs in by_user.items() if len({c.node for c in cs}) == 2)
        sender = next(c for c in clients if c.node not in {t.node for t in targets})
        assert (await sender.hub.send_private(target_user, "psst"))["type"] == "ack"
        await marker(session, cluster, 2)
        await expect_each(targets, lambda f: f["type"] == "private_message" and f["data"] == {
            "to": target_user, "message": "psst"} and f["user_id"] == sender.user, "private message")
        await expect_each(clients, is_marker(2), "marker after the private message")

        # a client's broadcast, then an HTTP broadcast through nginx, reach all 30
        assert (await clients[-1].hub.broadcast({"n": 3}))["type"] == "ack"
        await expect_each(clients, lambda f: f["type"] == "broadcast" and f["data"] == {"n": 3}
                          and f["user_id"] == clients[-1].user, "client broadcast")
        await marker(session, cluster, 4)
        await expect_each(clients, is_marker(4), "HTTP broadcast through nginx")


async def test_hubctl_members_match_the_connections(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """`hubctl members ROOM --json` and GET /api/rooms/ROOM through nginx list every connection with its node."""
    async with open_clients(session, cluster, "members", lambda i: ("census",)) as clients:
        expected = expected_members(clients)
        listed = await hubctl(cluster, "members", "census")
        assert listed["room"] == "census"
        assert as_rows(listed["members"]) == expected
        assert as_rows(await room_members(session, cluster, "census")) == expected
        nodes = await hubctl(cluster, "nodes")
        assert {n["id"] for n in nodes["nodes"]} == NODES


async def test_killed_node_clients_reconnect_through_nginx_and_membership_converges(
        fresh_cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """After SIGKILL of a node its clients reconnect through nginx to the others and membership converges."""
    cluster = fresh_cluster
    async with open_clients(session, cluster, "fail", lambda i: ("lobby",)) as clients:
        assert as_rows((await hubctl(cluster, "members", "lobby"))["members"]) == expected_members(clients)
        victim = "node2"
        victims = [c for c in clients if c.node == victim]
        bystanders = [c for c in clients if c.node != victim]
        assert victims and bystanders

        killed_at = time.monotonic()
        cluster.procs[victim].popen.send_signal(signal.SIGKILL)
        await wait_until(lambda: all(c.up_at is not None and c.ready.is_set() for c in victims), 10,
                         what="the killed node's clients to reconnect")
        reconnected = time.monotonic()

        # within 4 heartbeats of the kill, Redis lists every client, on the survivors only
        async def converged() -> bool:
            return as_rows(await room_members(session, cluster, "lobby")) == expected_members(clients)

        await wait_until(converged, 4 * HEARTBEAT, interval=0.02,
                         what="membership without the killed node (GET /api/rooms/lobby)")
        converged_at = time.monotonic()
        assert converged_at <= killed_at + 4 * HEARTBEAT * SCALE + 0.25, converged_at - killed_at

        listed = await hubctl(cluster, "members", "lobby")
        assert as_rows(listed["members"]) == expected_members(clients)
        assert {m["node"] for m in listed["members"]} == NODES - {victim}
        assert {n["id"] for n in (await hubctl(cluster, "nodes"))["nodes"]} == NODES - {victim}
        assert all(len(c.nodes) == 1 for c in bystanders), "a client of a live node was disconnected"
        assert all(c.nodes[0] == victim and c.node != victim for c in victims)

        # the reconnected clients are full members again
        await marker(session, cluster, 5)
        await expect_each(clients, is_marker(5), "broadcast after the failover")

        downs = [(c.down_at or 0) - killed_at for c in victims]
        ups = [(c.up_at or 0) - (c.down_at or 0) for c in victims]
        handshakes = [(c.up_at or 0) - (c.retry_at or 0) for c in victims]
        print(f"\nfailover through nginx, {len(victims)} clients of {victim} (SIGKILL):"
              f"\n  close seen after kill: max {max(downs) * 1000:.0f} ms"
              f"\n  reconnect (close -> connected and re-joined): median {statistics.median(ups) * 1000:.0f} ms,"
              f" max {max(ups) * 1000:.0f} ms (includes the client's first backoff, 125-250 ms)"
              f"\n  of which the attempt through nginx (handshake, connected, re-join):"
              f" median {statistics.median(handshakes) * 1000:.0f} ms, max {max(handshakes) * 1000:.0f} ms"
              f"\n  all clients back {(reconnected - killed_at) * 1000:.0f} ms after the kill"
              f"\n  membership converged {(converged_at - killed_at) * 1000:.0f} ms after the kill"
              f" (heartbeat {HEARTBEAT} s, bound {4 * HEARTBEAT * 1000:.0f} ms)")


def test_cluster_script_prints_urls_and_ctrl_c_stops_what_it_started(tmp_path: Path) -> None:
    """`python -m deploy.cluster` prints working URLs and PIDs; SIGINT stops every one of them and exits 0."""
    out = tmp_path / "out.txt"
    port = free_port()
    with out.open("w") as sink:
        script = subprocess.Popen([sys.executable, "-m", "deploy.cluster", "--port", str(port), "--nodes", "2",
                                   "--redis-port", "0"],
                                  stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until_sync(lambda: "Ctrl-C stops everything." in out.read_text() or script.poll() is not None, 30,
                        "the cluster script to print its summary")
        text = out.read_text()
        assert script.poll() is None, text
        pids = [int(p) for p in re.findall(r"\bpid (\d+)", text)]
        assert len(pids) == 4, text  # redis, two nodes, nginx
        assert f"ws://127.0.0.1:{port}/ws" in text
        workdir = Path(re.findall(r"logs\s+(\S+)/\*\.log", text)[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as resp:
            assert json.load(resp)["nodes"] == 2
        script.send_signal(signal.SIGINT)
        assert script.wait(30 * SCALE) == 0, out.read_text()
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workdir.exists()
