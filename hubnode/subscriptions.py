"""Keeps the broker subscribed to the channels this node needs, and lets go late.

Who needs which channel has one owner: the routing table (plus the two
channels every node always holds, `all` and its own node channel). The table's
mutators return a `Change` naming the channels that gained their first or
lost their last local member; `apply(change)` turns that into SUBSCRIBE and
(after a grace period) UNSUBSCRIBE. The broker keeps no list: on every
(re)connection it subscribes `wanted()`, the answer kept here.

A channel is released a grace period (about 2 s) after its last member left,
in batches, so a client that reconnects or hops between rooms does not cost a
SUBSCRIBE/UNSUBSCRIBE round trip each time. One operation per channel is in
flight at a time (the per-channel "lock" is the future of that operation), so
a join racing a delayed unsubscribe always ends subscribed, and a release that
falls due while a SUBSCRIBE is still in flight is tried again afterwards
rather than forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from hubnode.broker.base import Broker
from hubnode.routing import Change
from hubnode.supervisor import Supervisor

__all__ = ["Subscriptions"]

log = logging.getLogger(__name__)


class Subscriptions:
    """Reconciles the broker to the table: `in_use` is asked, never counted here."""

    def __init__(self, broker: Broker, in_use: Callable[[str], bool], grace: float, *,
                 pinned: Iterable[str] = (), supervisor: Supervisor | None = None) -> None:
        self._broker = broker
        self._in_use = in_use
        self._grace = grace
        self._pinned = frozenset(pinned)
        self._tasks = supervisor or Supervisor()
        self._subscribed: set[str] = set()  # confirmed by the broker (in use, or in grace)
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._releasing: dict[str, float] = {}
        self.unsubscribe_failures = 0

    def wanted(self) -> list[str]:
        """Every channel the broker must hold now: what it subscribes on a reconnect."""
        return [*self._pinned, *self._subscribed]  # pinned channels never enter _subscribed

    def needed(self, channel: str) -> bool:
        return channel in self._pinned or self._in_use(channel)

    async def apply(self, change: Change, confirm: Iterable[str] = ()) -> None:
        """Carry out a table change: release what it dropped, subscribe what it added.

        Also waits for `confirm`: a channel this caller relies on whose
        SUBSCRIBE another caller may have in flight. Raises BrokerUnavailable.
        """
        self.release(change.release)
        todo = dict.fromkeys([*change.subscribe, *confirm])
        if len(todo) == 1:
            await self.ensure(next(iter(todo)))
        elif todo:
            await asyncio.gather(*(self.ensure(ch) for ch in todo))

    async def ensure(self, channel: str) -> None:
        """Return once `channel` is subscribed and confirmed (BrokerUnavailable if not)."""
        self._releasing.pop(channel, None)
        while (pending := self._inflight.get(channel)) is not None:
            await asyncio.shield(pending)
        if channel in self._subscribed:
            return
        await self._run(channel, self._subscribe(channel))

    def release(self, channels: Iterable[str]) -> None:
        """Schedule an unsubscribe of `channels` after the grace period."""
        deadline = asyncio.get_running_loop().time() + self._grace
        for channel in channels:
            if channel not in self._pinned:
                self._releasing[channel] = deadline
        if self._releasing:
            self._tasks.spawn("unsubscribe", self._flush_loop)

    async def close(self) -> None:
        await self._tasks.stop("unsubscribe")

    async def _subscribe(self, channel: str) -> None:
        try:
            await self._broker.subscribe([channel])
        except BaseException:
            # timed out or cancelled after SUBSCRIBE went out: take it back, or
            # the broker would go on delivering a channel nobody will release
            await self._unsubscribe([channel])
            raise
        self._subscribed.add(channel)

    async def _unsubscribe(self, channels: list[str]) -> None:
        self._subscribed.difference_update(channels)
        try:
            await self._broker.unsubscribe(channels)
        except Exception:  # a reconnect subscribes wanted() only, so the channels are gone then
            self.unsubscribe_failures += 1
            log.warning("unsubscribe of %d channels failed", len(channels), exc_info=True)

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
                if ch in self._inflight:  # decide once that operation is over
                    self._releasing[ch] = now + self._grace
                else:
                    del self._releasing[ch]
            batch = [ch for ch in due if ch in self._subscribed and ch not in self._inflight
                     and not self.needed(ch)]
            if batch:
                await self._unsubscribe_batch(batch)

    async def _unsubscribe_batch(self, batch: list[str]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        for ch in batch:
            self._inflight[ch] = done
        try:
            await self._unsubscribe(batch)
        finally:
            for ch in batch:
                self._inflight.pop(ch, None)
            done.set_result(None)
