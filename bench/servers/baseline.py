"""The bare asyncio floor: aiohttp plus one Redis subscriber, no hub around it.

It speaks the subset of hubnode's client protocol the load clients use
(`connected` frame, `join_room` with ack) and subscribes to `base:room:<r>`
and `base:user:<u>` channels. A publisher puts the finished client JSON on the
channel, so per message the node only prefixes a WebSocket header once and
writes the same bytes to every local member's transport. No validation,
membership store, envelope, rate limit or metrics: what is left is the cost of
Python, aiohttp, redis-py and the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
from collections import defaultdict

import redis.asyncio as aioredis
from aiohttp import WSMsgType, web

from hubnode.protocol import text_frame

PREFIX = "base:"


class Floor:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.members: defaultdict[str, set[asyncio.Transport]] = defaultdict(set)
        self.confirms: dict[str, asyncio.Future[None]] = {}
        self.ids = itertools.count(1)
        self.reader: asyncio.Task[None] | None = None

    async def start(self, _app: web.Application) -> None:
        await self.pubsub.subscribe(f"{PREFIX}all")
        self.reader = asyncio.create_task(self.read())

    async def stop(self, _app: web.Application) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def read(self) -> None:
        async for item in self.pubsub.listen():
            channel = item["channel"].decode()
            if item["type"] == "message":
                frame = text_frame(item["data"])
                for transport in self.members.get(channel, ()):
                    transport.write(frame)
            elif item["type"] == "subscribe" and channel in self.confirms:
                self.confirms.pop(channel).set_result(None)

    async def add(self, channel: str, transport: asyncio.Transport) -> None:
        # like hubnode, a join is answered only once Redis confirmed the subscription
        first = channel not in self.members
        self.members[channel].add(transport)
        if first:
            self.confirms[channel] = asyncio.get_running_loop().create_future()
            await self.pubsub.subscribe(channel)
        if channel in self.confirms:
            await asyncio.shield(self.confirms[channel])

    def remove(self, channel: str, transport: asyncio.Transport) -> None:
        members = self.members.get(channel)
        if members is not None:
            members.discard(transport)
            if not members:
                del self.members[channel]

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        user = request.query.get("user_id")
        channels = [f"{PREFIX}all"] + ([f"{PREFIX}user:{user}"] if user else [])
        for channel in channels:
            await self.add(channel, transport)
        data = {"conn_id": f"base:{next(self.ids)}", "user_id": user, "node": "base"}
        await ws.send_str(json.dumps({"type": "connected", "data": data}))
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if frame.get("type") == "join_room":
                    channel = f"{PREFIX}room:{frame['data']}"
                    channels.append(channel)
                    await self.add(channel, transport)
                    await ws.send_str(json.dumps({"type": "ack", "id": frame.get("id")}))
        finally:
            for channel in channels:
                self.remove(channel, transport)
        return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    floor = Floor(args.redis_url)
    app = web.Application()
    app.router.add_get("/ws", floor.handler)
    app.on_startup.append(floor.start)
    app.on_cleanup.append(floor.stop)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
