"""The JSON the dashboard reads: live nodes, and every node's counters and latency.

`GET /api/nodes` lists the live nodes of the cluster (from Redis, with the same
query `hubctl nodes` runs) or, on a single node, just this one.
`GET /api/metrics` is this node's own counters and delivery-latency histogram,
cumulative since it started: a reader computes rates and recent latency from
the difference of two samples, the way Prometheus does.
`GET /api/cluster/metrics` is the same snapshot for every live node: this
node's read now, the others' as they stored them in Redis on their last
heartbeat. Behind a load balancer each request may reach another node, so
the dashboard reads this one and never depends on which node answered.
Numbers stay per node; the reader sums them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import Histogram

from hubnode.node import Node

__all__ = ["Buckets", "cluster_metrics", "latency_snapshot", "live_nodes", "metrics_snapshot", "quantile"]

log = logging.getLogger(__name__)

Buckets = Sequence[tuple[float, float]]
"""Cumulative histogram buckets: (upper bound in seconds, count of observations <= it), +Inf last."""


async def live_nodes(node: Node) -> list[dict[str, Any]]:
    """Every live node as JSON: the Redis registry in cluster mode, else this node alone."""
    return [info.to_json() for info in await node.nodes()]


def metrics_snapshot(node: Node, latency: Histogram | None = None) -> dict[str, Any]:
    """This node's cumulative counters and latency histogram, stamped with the time read."""
    c, now = node.counters, time.time()
    return {
        "node": node.id,
        "time": round(now, 3),
        "started_at": node.started_at,
        "uptime": round(now - node.started_at, 3),
        "clients": len(node.conns),
        "rooms_local": node.local_room_count(),
        "published": c.published,
        "delivered": c.delivered,
        "bytes_out": c.bytes_out,
        "dropped": c.dropped,
        "duplicates": c.duplicates,
        "reserved_dropped": c.reserved,
        "resyncs": c.resyncs,
        "slow_closes": c.slow_closes,
        "frames": dict(c.frames),
        "errors": {str(code): n for code, n in c.errors.items()},
        "control": dict(c.control),
        "latency": latency_snapshot(latency),
    }


async def cluster_metrics(node: Node, latency: Histogram | None = None) -> list[dict[str, Any]]:
    """One snapshot per live node, in node id order: this node's read now, the others' from Redis.

    The serving node is always listed (it is answering, so it is alive, even
    before its registration shows). A live node with no stored snapshot yet,
    or an unreadable one, is left out: /api/nodes still lists it.
    """
    ids = sorted({info.id for info in await node.nodes()} | {node.id})
    stored = await node.stored_metrics([i for i in ids if i != node.id])
    own = metrics_snapshot(node, latency)
    found = {node.id: own, **{i: s for i, raw in stored.items() if (s := _stored_snapshot(i, raw)) is not None}}
    return [found[i] for i in ids if i in found]


def _stored_snapshot(node_id: str, raw: bytes) -> dict[str, Any] | None:
    """A snapshot a node stored, or None when it does not decode to that node's snapshot."""
    try:
        snapshot = orjson.loads(raw)
    except orjson.JSONDecodeError:
        snapshot = None
    if isinstance(snapshot, dict) and snapshot.get("node") == node_id:
        return snapshot
    log.debug("ignoring an unreadable metrics snapshot stored for node %s", node_id)  # polled: no log flood
    return None


def latency_snapshot(histogram: Histogram | None) -> dict[str, Any] | None:
    """The delivery-latency histogram (hubnode.metrics' `app[LATENCY]`) as JSON, or None."""
    if histogram is None:
        return None
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return {
        "count": int(count),
        "sum": round(total, 6),
        "buckets": [[_le_json(le), int(n)] for le, n in buckets],
        "p50": _rounded(quantile(buckets, 0.5)),
        "p99": _rounded(quantile(buckets, 0.99)),
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def _le_json(le: float) -> float | str:
    return "+Inf" if math.isinf(le) else le


def quantile(buckets: Buckets, q: float) -> float | None:
    """Estimate the q-quantile from cumulative buckets (Prometheus' histogram_quantile).

    Linear interpolation inside the bucket holding the rank; an answer in the
    +Inf bucket is reported as the last finite bound. None without observations.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower
