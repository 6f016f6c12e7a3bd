"""The `Broker` interface (after centrifuge's Broker).

A broker carries opaque payloads on named channels between nodes. It never
sees connections: it hands every publication on a subscribed channel to the
one handler the node registered with `start`, including publications made by
this very node (one path for every message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hubnode.supervisor import Supervisor
    from publisher.history import HistoryPolicy, StreamRead, StreamRef

__all__ = ["Broker", "BrokerCounters", "BrokerUnavailable", "MessageHandler", "ResyncHandler", "WantedChannels"]

MessageHandler = Callable[[str, bytes], None]
"""`on_message(channel, payload)`: called on the event loop, must not block."""

ResyncHandler = Callable[[], None]
"""Called after the broker lost its subscription and restored it: messages may be lost."""


WantedChannels = Callable[[], Iterable[str]]
"""Every channel the node needs subscribed now. The node (its `Subscriptions`)
owns that answer; a broker asks it whenever it (re)connects and keeps no list
of its own, so the two can never disagree."""


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached.

    `maybe_published` is False when nothing left this node (the broker was
    known to be down), True when a PUBLISH was sent but its answer was lost
    (timeout, broken connection): it may have been delivered, and a client
    should be told so rather than "nothing was published".
    """

    def __init__(self, message: str, *, maybe_published: bool = False) -> None:
        super().__init__(message)
        self.maybe_published = maybe_published


@dataclass(frozen=True, slots=True)
class BrokerCounters:
    """What a broker counts, for /metrics (all zero for the memory broker)."""

    reconnects: int = 0
    probe_failures: int = 0
    overflows: int = 0
    oversized: int = 0


class Broker(Protocol):
    """Pub/sub transport; a memory and a Redis implementation exist."""

    @property
    def connected(self) -> bool:
        """True while publishes and subscriptions can succeed."""
        ...

    @property
    def counters(self) -> BrokerCounters:
        ...

    async def start(self, handler: MessageHandler, on_resync: ResyncHandler | None = None, *,
                    wanted: WantedChannels | None = None, supervisor: Supervisor | None = None) -> None:
        """Begin delivering publications to `handler`; call once before anything else.

        The broker subscribes `wanted()` on every (re)connection; its
        long-lived tasks run under `supervisor`.
        """
        ...

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Return once the broker confirmed every subscription (raises BrokerUnavailable).

        The caller owns the channel list: after a failure it decides whether
        to `unsubscribe` (the SUBSCRIBE may still reach the broker).
        """
        ...

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop receiving `channels`; best effort, never raises for a lost broker."""
        ...

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish; returns how many nodes took it. Raises BrokerUnavailable."""
        ...

    async def publish_stream(self, ref: StreamRef, payload: bytes, envelope_id: str, size: int, ttl: int) -> int:
        """Publish to a room's or user's channel, appending to its history when it has one
        (or when `size` > 0 creates it); one atomic step. Raises BrokerUnavailable."""
        ...

    async def read_stream(self, ref: StreamRef, since: int, limit: int = 0,
                          create: HistoryPolicy | None = None) -> StreamRead:
        """The stream's position and its envelopes above `since` (-1: position only).

        With `create`, a stream without an epoch gets one at offset 0.
        Raises BrokerUnavailable.
        """
        ...

    async def close(self) -> None:
        """Stop delivering and release connections."""
        ...
