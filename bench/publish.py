"""The external publisher: a worker process putting messages on Redis.

It PUBLISHes payloads a `System` built (msgpack envelopes for hubnode, the
Socket.IO manager's JSON, the Node.js emitter's msgpack, raw JSON for the
baseline), pipelined in batches when flooding; with hubnode's history on, it
runs the history script instead (EVALSHA, the script loaded once). For
hubnode without cluster mode it POSTs to one node's /broadcast instead (that
costs the node an HTTP request per message: the results say so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.systems import Deployment, Eval, Item

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
        self.loaded: set[str] = set()

    async def publish(self, items: Sequence[Item]) -> list[Any]:
        """Publish in order, pipelined `BATCH` at a time (or POSTed one by one).

        Returns Redis's replies: PUBLISH's receiver count, or the history
        script's `[receivers, offset, epoch]`.
        """
        replies: list[Any] = []
        if self.redis is not None:
            for k in range(0, len(items), BATCH):
                chunk = items[k:k + BATCH]
                await self._load_scripts(chunk)
                pipe = self.redis.pipeline(transaction=False)
                for item in chunk:
                    if isinstance(item, Eval):
                        pipe.evalsha(item.sha, len(item.keys), *item.keys, *item.args)
                    else:
                        pipe.publish(*item)
                out = await pipe.execute()
                self.receivers += sum(r[0] if isinstance(r, list) else r for r in out)
                replies.extend(out)
            return replies
        assert self.session is not None
        base = self.dep.http[0]
        for item in items:
            assert not isinstance(item, Eval), "a script call needs Redis"
            path, body = item
            async with self.session.post(base + path, data=body) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"POST {path} answered {resp.status}: {await resp.text()}")
        return replies

    async def _load_scripts(self, items: Sequence[Item]) -> None:
        """SCRIPT LOAD each script these items run, once per publisher."""
        assert self.redis is not None
        for item in items:
            if isinstance(item, Eval) and item.sha not in self.loaded:
                sha = await self.redis.script_load(item.text)
                if sha != item.sha:
                    raise RuntimeError(f"Redis loaded the script as {sha}, expected {item.sha}")
                self.loaded.add(item.sha)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        if self.session is not None:
            await self.session.close()
            await asyncio.sleep(0)
