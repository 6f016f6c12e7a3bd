"""GET /api/nodes and GET /api/metrics, the JSON behind /dashboard."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from hubnode.dashboard_api import quantile
from tests.conftest import node_config, start_server
from tests.helpers import Client, RedisServer, wait_until


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
    """With --api-key, /api/nodes and /api/metrics answer 401 without the key and 200 with it."""
    server = await start_server(node_config(api_key=("k1",)))
    try:
        for path in ("/api/nodes", "/api/metrics"):
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


def test_quantile_interpolates_inside_the_bucket() -> None:
    """quantile() follows Prometheus' histogram_quantile: linear inside the bucket holding the rank."""
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(buckets, 0.5) == 0.01
    assert math.isclose(quantile(buckets, 0.7) or 0, 0.01 + 0.09 * 0.5)
    assert math.isclose(quantile(buckets, 0.99) or 0, 0.1 + 0.9 * 0.9)
    assert quantile([(0.01, 0.0), (math.inf, 0.0)], 0.5) is None
    assert quantile([(0.01, 1.0), (math.inf, 10.0)], 0.99) == 0.01  # in +Inf: the last finite bound
