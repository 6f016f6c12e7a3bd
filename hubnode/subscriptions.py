"""Which room and user channels this node is subscribed to, and when to let go.

A channel is subscribed when its first local member arrives, and released a
grace period (about 2 s) after the last one leaves, in batches, so a client
that reconnects or hops between rooms does not cost a SUBSCRIBE/UNSUBSCRIBE
round trip each time. One operation per channel is in flight at a time (the
per-channel "lock" is the future of that operation), so a join racing a
delayed unsubscribe always ends subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from hubnode.broker.base import Broker

__all__ = ["Subscriptions"]

log = logging.getLogger(__name__)


class Subscriptions:
    """Reference-free subscription bookkeeping: `in_use` is asked, not counted."""

    def __init__(self, broker: Broker, in_use: Callable[[str], bool], grace: float) -> None:
        self._broker = broker
        self._in_use = in_use
        self._grace = grace
        self._active: set[str] = set()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._releasing: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def ensure(self, channel: str) -> None:
        """Return once `channel` is subscribed and confirmed (BrokerUnavailable if not)."""
        self._releasing.pop(channel, None)
        while (pending := self._inflight.get(channel)) is not None:
            await asyncio.shield(pending)
        if channel in self._active:
            return
        await self._run(channel, self._subscribe(channel))

    def release(self, channels: Iterable[str]) -> None:
        """Schedule an unsubscribe of `channels` after the grace period."""
        deadline = asyncio.get_running_loop().time() + self._grace
        for channel in channels:
            self._releasing[channel] = deadline
        if self._releasing and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_loop(), name="hubnode-unsubscribe")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    async def _subscribe(self, channel: str) -> None:
        await self._broker.subscribe([channel])
        self._active.add(channel)

    async def _unsubscribe(self, channels: list[str]) -> None:
        self._active.difference_update(channels)
        await self._broker.unsubscribe(channels)

    async def _run(self, channel: str, op: object) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[channel] = future
        try:
            await op  # type: ignore[misc]
        finally:
            del self._inflight[channel]
            future.set_result(None)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._releasing:
            now = loop.time()
            wake = min(self._releasing.values())
            if wake > now:
                await asyncio.sleep(wake - now)
                continue
            due = [ch for ch, t in self._releasing.items() if t <= now]
            for ch in due:
                del self._releasing[ch]
            batch = [ch for ch in due if ch in self._active and ch not in self._inflight
                     and not self._in_use(ch)]
            if batch:
                await self._unsubscribe_batch(batch)

    async def _unsubscribe_batch(self, batch: list[str]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        for ch in batch:
            self._inflight[ch] = done
        try:
            await self._unsubscribe(batch)
        except Exception:  # the broker resubscribes from its own set on reconnect
            log.debug("unsubscribe of %d channels failed", len(batch), exc_info=True)
        finally:
            for ch in batch:
                self._inflight.pop(ch, None)
            done.set_result(None)
