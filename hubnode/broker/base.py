"""The `Broker` interface (after centrifuge's Broker).

A broker carries opaque payloads on named channels between nodes. It never
sees connections: it hands every publication on a subscribed channel to the
one handler the node registered with `start`, including publications made by
this very node (one path for every message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["Broker", "BrokerUnavailable", "MessageHandler", "ResyncHandler"]

MessageHandler = Callable[[str, bytes], None]
"""`on_message(channel, payload)`: called on the event loop, must not block."""

ResyncHandler = Callable[[], None]
"""Called after the broker lost its subscription and restored it: messages may be lost."""


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached: nothing was published or subscribed."""


class Broker(Protocol):
    """Pub/sub transport; a memory and a Redis implementation exist."""

    @property
    def connected(self) -> bool:
        """True while publishes and subscriptions can succeed."""
        ...

    async def start(self, handler: MessageHandler, on_resync: ResyncHandler | None = None) -> None:
        """Begin delivering publications to `handler`; call once before anything else."""
        ...

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Return once the broker confirmed every subscription (raises BrokerUnavailable)."""
        ...

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop receiving `channels`; best effort, never raises for a lost broker."""
        ...

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish; returns how many nodes took it. Raises BrokerUnavailable."""
        ...

    async def close(self) -> None:
        """Stop delivering and release connections."""
        ...
