"""The node's plain counters and the store interface for sharing metrics snapshots.

Kept apart from `hubnode.node` so the node module stays about connections and
messages; `hubnode.metrics` and `hubnode.dashboard_api` read these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["MetricsSource", "MetricsStore", "NodeCounters"]


MetricsSource = Callable[[], dict[str, Any]]
"""This node's metrics snapshot as JSON-ready data (hubnode.dashboard_api's, set by the app)."""


@runtime_checkable
class MetricsStore(Protocol):
    """A membership store that also shares nodes' metrics snapshots (the Redis store).

    The memory store of a single node has nobody to share them with, so it
    does not implement this.
    """

    async def put_metrics(self, payload: bytes) -> None:
        """Store this node's snapshot, expiring 3 heartbeats later."""
        ...

    async def node_metrics(self, node_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored snapshots of these nodes (a node without one is left out)."""
        ...


class NodeCounters:
    """Plain counters the metrics module exposes; cheap enough for the hot path."""

    __slots__ = ("delivered", "bytes_out", "dropped", "resyncs", "slow_closes", "published",
                 "frames", "errors", "duplicates", "reserved", "heartbeat_failures", "metrics_failures",
                 "control")

    def __init__(self) -> None:
        self.frames: Counter[str] = Counter()
        self.control: Counter[str] = Counter()  # control commands taken, by op (docs/protocol.md)
        self.errors: Counter[str] = Counter()
        self.duplicates = 0  # envelopes whose id was delivered already (a publisher's retry)
        self.reserved = 0  # envelopes of a node-only type (ack, error, ...) from Redis: dropped
        self.heartbeat_failures = 0
        self.metrics_failures = 0  # snapshots for the cluster dashboard that could not be stored
        self.delivered = 0
        self.bytes_out = 0
        self.dropped = 0
        self.resyncs = 0
        self.slow_closes = 0
        self.published = 0
