"""A slow consumer is closed with 1013 and never delays anyone else."""

from __future__ import annotations

import asyncio

import aiohttp

from hubnode.app import NODE
from tests.conftest import node_config, start_server
from tests.helpers import Client, raw_ws_connect, read_frames, wait_until


async def test_slow_consumer_closed_1013_reader_gets_everything(session: aiohttp.ClientSession) -> None:
    """A client that never reads while MiBs go to its room is closed 1013; a reading member gets all."""
    limit = 256 * 1024
    server = await start_server(node_config(max_outbound_bytes=limit, rate=0))
    node = server.app[NODE]
    try:
        slow = await asyncio.to_thread(raw_ws_connect, server.port)
        slow_id = await wait_until(lambda: next(iter(node.conns), None), what="slow client registered")
        await node.join_room(slow_id, "room")
        reader = await Client.open(session, str(server.make_url("/ws")) + "?user_id=reader")
        await reader.join("room")
        payload = "x" * 8000
        total = 512  # 4 MiB in all
        received = 0

        async def read_all() -> None:
            nonlocal received
            while received < total:
                frame = await reader.recv_type("bulk", timeout=10)
                assert frame["data"]["n"] == received  # in order, none missing
                received += 1

        consumer = asyncio.create_task(read_all())
        for n in range(total):
            await node.broadcast_to_room("room", {"type": "bulk", "data": {"n": n, "p": payload}})
            if n % 16 == 0:
                await asyncio.sleep(0)  # let the reader's socket drain, as a real loop would
        await asyncio.wait_for(consumer, 30)
        assert received == total
        assert node.conns[slow_id].closing
        frames = await asyncio.to_thread(read_frames, slow)  # the slow client finally reads
        assert frames[-1][0] == 0x8, "last frame is a close frame"
        assert int.from_bytes(frames[-1][1][:2], "big") == 1013
        slow.close()
        await wait_until(lambda: slow_id not in node.conns, what="slow consumer removed")
        assert node.counters.slow_closes == 1
    finally:
        await server.close()
