"""GET /api/nodes, GET /api/metrics and GET /api/cluster/metrics, the JSON behind /dashboard."""

from __future__ import annotations

import math
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from hubnode.app import NODE
from hubnode.dashboard_api import quantile
from publisher.keys import Keys
from tests.conftest import node_config, start_server
from tests.helpers import Client, NodeProcess, RedisServer, wait_until


async def _json(session: aiohttp.ClientSession, server: TestServer, path: str) -> dict[str, Any]:
    resp = await session.get(server.make_url(path))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_nodes_on_a_single_node_is_that_node(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """Without Redis, /api/nodes lists the answering node alone, with its client count and no heartbeat."""
    client = await Client.open(session, str(hub.make_url("/ws")))
    body = await _json(session, hub, "/api/nodes")
    assert body["self"] == "n1"
    [node] = body["nodes"]
    assert node["id"] == "n1" and node["clients"] == 1 and node["heartbeat_age"] is None
    assert node["version"] and node["started_at"] > 0
    await client.close()


async def test_metrics_count_deliveries_and_latency(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """/api/metrics grows with traffic: published, delivered, and the latency histogram's count."""
    before = await _json(session, hub, "/api/metrics")
    a = await Client.open(session, str(hub.make_url("/ws")) + "?user_id=a")
    b = await Client.open(session, str(hub.make_url("/ws")) + "?user_id=b")
    for c in (a, b):
        await c.join("r")
    await a.send({"type": "room_message", "data": {"room": "r", "message": "hi"}})
    for c in (a, b):
        await c.recv_type("room_message")
    after = await _json(session, hub, "/api/metrics")
    assert after["node"] == "n1" and after["clients"] == 2 and after["time"] >= before["time"]
    assert after["published"] - before["published"] == 1
    assert after["delivered"] - before["delivered"] == 2
    latency = after["latency"]
    assert latency["count"] - (before["latency"]["count"]) == 1  # one publish, observed once per node
    assert latency["buckets"][-1] == ["+Inf", latency["count"]]
    assert latency["p50"] is not None and latency["sum"] >= 0
    assert after["frames"]["room_message"] == 1 and after["frames"]["join_room"] == 2


async def test_dashboard_api_requires_the_api_key(session: aiohttp.ClientSession) -> None:
    """With --api-key, /api/nodes, /api/metrics and /api/cluster/metrics answer 401 without the key and 200 with it."""
    server = await start_server(node_config(api_key=("k1",)))
    try:
        for path in ("/api/nodes", "/api/metrics", "/api/cluster/metrics"):
            assert (await session.get(server.make_url(path))).status == 401
            ok = await session.get(server.make_url(path), headers={"Authorization": "Bearer k1"})
            assert ok.status == 200
        page = await session.get(server.make_url("/dashboard"))  # the page itself asks for the key
        assert page.status == 200 and "API key" in await page.text()
    finally:
        await server.close()


async def test_nodes_in_a_cluster_lists_live_nodes(redis_server: RedisServer, prefix: str,
                                                   session: aiohttp.ClientSession) -> None:
    """In cluster mode /api/nodes lists every live node from Redis, with clients and heartbeat age."""
    servers = [await start_server(node_config(node_id=n, redis_url=redis_server.url, key_prefix=prefix,
                                              heartbeat=0.2)) for n in ("x", "y")]
    try:
        client = await Client.open(session, str(servers[1].make_url("/ws")))

        async def both_beating() -> dict[str, Any] | None:
            body = await _json(session, servers[0], "/api/nodes")
            ok = [n["id"] for n in body["nodes"] if n["heartbeat_age"] is not None] == ["x", "y"]
            return body if ok else None

        body = await wait_until(both_beating, what="both nodes with a heartbeat")
        assert body["self"] == "x"
        clients = {n["id"]: n["clients"] for n in body["nodes"]}
        assert clients == {"x": 0, "y": 1}
        assert all(0 <= n["heartbeat_age"] < 5 and n["expires_in"] > 0 for n in body["nodes"])
        await client.close()
    finally:
        for server in servers:
            await server.close()


# -- /api/cluster/metrics: every node's snapshot, from any node --------------------------

@pytest.fixture
async def rclient(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _snapshots(session: aiohttp.ClientSession, server: TestServer) -> dict[str, dict[str, Any]]:
    """/api/cluster/metrics on `server`, by node id (and each node listed once)."""
    body = await _json(session, server, "/api/cluster/metrics")
    ids = [snap["node"] for snap in body["nodes"]]
    assert ids == sorted(set(ids)), ids
    return {snap["node"]: snap for snap in body["nodes"]}


async def _lists(session: aiohttp.ClientSession, server: TestServer, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Wait until /api/cluster/metrics on `server` lists exactly the nodes `ids`."""
    async def listed() -> dict[str, dict[str, Any]] | None:
        snapshots = await _snapshots(session, server)
        return snapshots if set(snapshots) == ids else None

    return await wait_until(listed, what=f"/api/cluster/metrics to list {sorted(ids)}")  # type: ignore[no-any-return]


async def _cluster_node(redis_server: RedisServer, prefix: str, node_id: str, heartbeat: float = 0.2) -> TestServer:
    return await start_server(node_config(node_id=node_id, redis_url=redis_server.url, key_prefix=prefix,
                                          heartbeat=heartbeat))


async def test_cluster_metrics_on_a_single_node_is_its_own(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """Without Redis, /api/cluster/metrics holds the answering node's own live snapshot alone."""
    [own] = (await _json(session, hub, "/api/cluster/metrics"))["nodes"]
    assert own["node"] == "n1" and own["started_at"] == hub.app[NODE].started_at
    assert own["latency"]["buckets"][-1][0] == "+Inf"


async def test_cluster_metrics_from_either_node_show_the_others_traffic(
        redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """Both nodes list both snapshots; messages delivered on y show up in x's answer, as y's numbers."""
    x, y = [await _cluster_node(redis_server, prefix, n) for n in ("x", "y")]
    try:
        await _lists(session, y, {"x", "y"})
        before = (await _lists(session, x, {"x", "y"}))["y"]
        client = await Client.open(session, str(y.make_url("/ws")))
        await client.join("dash")
        for n in range(3):
            resp = await session.post(x.make_url("/broadcast"), json={"type": "t", "data": n, "room": "dash"})
            assert resp.status == 202, await resp.text()
            await client.recv_type("t")

        async def y_delivered_all() -> dict[str, dict[str, Any]] | None:
            snapshots = await _snapshots(session, x)
            return snapshots if snapshots["y"]["delivered"] - before["delivered"] == 3 else None

        seen = await wait_until(y_delivered_all, what="x's answer to show y's three deliveries")
        assert seen["y"]["latency"]["count"] - before["latency"]["count"] == 3
        assert seen["y"]["clients"] == 1 and seen["y"]["started_at"] == y.app[NODE].started_at
        assert seen["x"]["delivered"] == 0 and seen["x"]["clients"] == 0  # x's own, not y's
        await client.close()
    finally:
        for server in (x, y):
            await server.close()


async def test_cluster_metrics_drop_a_killed_node(redis_server: RedisServer, prefix: str,
                                                  session: aiohttp.ClientSession, rclient: aioredis.Redis) -> None:
    """A node killed with SIGKILL leaves the answer, and its stored snapshot expires within 3 heartbeats."""
    key = Keys(prefix).node_metrics("k")
    x = await _cluster_node(redis_server, prefix, "x")
    killed = NodeProcess("--redis-url", redis_server.url, "--key-prefix", prefix, "--node-id", "k",
                         "--heartbeat", "0.2", "--redis-timeout", "1")
    try:
        killed.start()
        await _lists(session, x, {"x", "k"})
        assert 0 < await rclient.pttl(key) <= 600  # PX: 3 heartbeats of 0.2 s
        killed.signal(signal.SIGKILL)
        killed.wait()
        await _lists(session, x, {"x"})

        async def expired() -> bool:
            return await rclient.exists(key) == 0

        await wait_until(expired, what="the killed node's snapshot to expire")
    finally:
        killed.stop()
        await x.close()


async def test_a_drained_node_deletes_its_snapshot(redis_server: RedisServer, prefix: str,
                                                  session: aiohttp.ClientSession, rclient: aioredis.Redis) -> None:
    """Draining removes the node's snapshot at once, long before its 3-heartbeat expiry."""
    key = Keys(prefix).node_metrics("y")
    x = await _cluster_node(redis_server, prefix, "x")
    y = await _cluster_node(redis_server, prefix, "y", heartbeat=10.0)  # the snapshot would live 30 s
    try:
        await _lists(session, x, {"x", "y"})
        assert await rclient.pttl(key) > 20_000
        await y.close()  # drains the node
        assert await rclient.exists(key) == 0
        assert set(await _snapshots(session, x)) == {"x"}
    finally:
        await y.close()
        await x.close()


def test_quantile_interpolates_inside_the_bucket() -> None:
    """quantile() follows Prometheus' histogram_quantile: linear inside the bucket holding the rank."""
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(buckets, 0.5) == 0.01
    assert math.isclose(quantile(buckets, 0.7) or 0, 0.01 + 0.09 * 0.5)
    assert math.isclose(quantile(buckets, 0.99) or 0, 0.1 + 0.9 * 0.9)
    assert quantile([(0.01, 0.0), (math.inf, 0.0)], 0.5) is None
    assert quantile([(0.01, 1.0), (math.inf, 10.0)], 0.99) == 0.01  # in +Inf: the last finite bound
