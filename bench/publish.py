"""The external publisher: a worker process putting messages on Redis.

It PUBLISHes payloads a `System` built (msgpack envelopes for hubnode, the
Socket.IO manager's JSON, raw JSON for the baseline), pipelined in batches when
flooding. For hubnode without cluster mode it POSTs to one node's /broadcast
instead (that costs the node an HTTP request per message: the results say so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp
import redis.asyncio as aioredis

from bench.systems import Deployment, Item

__all__ = ["Publisher"]

BATCH = 200


class Publisher:
    """Publishes Items to a deployment; `published` counts Redis receivers (nodes) too."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.redis: aioredis.Redis | None = None
        self.session: aiohttp.ClientSession | None = None
        if dep.system.cluster and dep.redis is not None:
            self.redis = aioredis.from_url(dep.redis.url)
        else:
            self.session = aiohttp.ClientSession()
        self.receivers = 0

    async def publish(self, items: Sequence[Item]) -> None:
        """Publish in order, pipelined `BATCH` at a time (or POSTed one by one)."""
        if self.redis is not None:
            for k in range(0, len(items), BATCH):
                pipe = self.redis.pipeline(transaction=False)
                for channel, payload in items[k:k + BATCH]:
                    pipe.publish(channel, payload)
                self.receivers += sum(await pipe.execute())
            return
        assert self.session is not None
        base = self.dep.http[0]
        for path, body in items:
            async with self.session.post(base + path, data=body) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"POST {path} answered {resp.status}: {await resp.text()}")

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        if self.session is not None:
            await self.session.close()
            await asyncio.sleep(0)
