"""In-process broker: the single-node default.

`publish` calls the handler directly when the channel is subscribed, so a
single node has exactly the same message path as a cluster, minus the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hubnode.broker.base import BrokerCounters, BrokerUnavailable, MessageHandler, ResyncHandler, WantedChannels
from hubnode.broker.streams import MemoryStreams
from publisher.history import HistoryPolicy, StreamRead, StreamRef

if TYPE_CHECKING:
    from hubnode.supervisor import Supervisor

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """A Broker for one node in one process."""

    def __init__(self) -> None:
        self._handler: MessageHandler | None = None
        self._channels: set[str] = set()
        self._closed = False
        self.streams = MemoryStreams()

    @property
    def connected(self) -> bool:
        return self._handler is not None and not self._closed

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    @property
    def counters(self) -> BrokerCounters:
        return BrokerCounters()

    async def start(self, handler: MessageHandler, on_resync: ResyncHandler | None = None, *,
                    wanted: WantedChannels | None = None, supervisor: Supervisor | None = None) -> None:
        self._handler = handler
        if wanted is not None:
            self._channels.update(wanted())

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._check()
        self._channels.update(channels)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._channels.difference_update(channels)

    async def publish(self, channel: str, payload: bytes) -> int:
        self._check()
        if channel not in self._channels:
            return 0
        assert self._handler is not None
        self._handler(channel, payload)
        return 1

    async def publish_stream(self, ref: StreamRef, payload: bytes, envelope_id: str, size: int, ttl: int) -> int:
        self._check()
        body = self.streams.append(ref, payload, envelope_id, size, ttl, time.monotonic())
        if body == b"":
            return 0  # a retry of what was just delivered
        return await self.publish(ref.channel, payload if body is None else body)

    async def read_stream(self, ref: StreamRef, since: int, limit: int = 0,
                          create: HistoryPolicy | None = None) -> StreamRead:
        self._check()
        made = None if create is None else (create.size, create.ttl)
        return self.streams.read(ref, since, limit, made, time.monotonic())

    async def close(self) -> None:
        self._closed = True
        self._channels.clear()

    def _check(self) -> None:
        if not self.connected:
            raise BrokerUnavailable("memory broker is not started or closed")
