"""/metrics parses with prometheus-client's parser and its counters move with traffic."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, hub: TestServer) -> Samples:
    text = await (await session.get(hub.make_url("/metrics"))).text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_move_with_traffic(hub: TestServer, session: aiohttp.ClientSession) -> None:
    """Connections, frames by type, deliveries, errors by code and latency are exported."""
    before = await scrape(session, hub)
    assert before[("hubnode_connections", ())] == 0
    a, b = [await Client.open(session, str(hub.make_url("/ws")) + f"?user_id={u}") for u in "ab"]
    await a.join("r")
    await b.join("r")
    await a.send({"type": "room_message", "data": {"room": "r", "message": 1}})
    await b.recv_type("room_message")
    await a.ws.send_str("junk")
    await a.recv_type("error")
    after = await scrape(session, hub)
    assert after[("hubnode_connections", ())] == 2
    assert after[("hubnode_rooms_local", ())] == 1
    assert after[("hubnode_client_frames_total", (("type", "join_room"),))] == 2
    assert after[("hubnode_client_frames_total", (("type", "room_message"),))] == 1
    assert after[("hubnode_client_errors_total", (("code", "bad_json"),))] == 1
    # 2 connected frames are not messages; the room message reached 2 sockets
    assert after[("hubnode_messages_delivered_total", ())] == 2
    assert after[("hubnode_bytes_out_total", ())] > 0
    assert after[("hubnode_delivery_latency_seconds_count", ())] == 1
    assert ("hubnode_redis_reconnects_total", ()) in after
