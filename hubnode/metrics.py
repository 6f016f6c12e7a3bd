"""Prometheus metrics on `GET /metrics`.

The hot path only bumps plain integer counters on the node; this collector
turns them into Prometheus families when scraped, so metrics cost nothing per
socket and almost nothing per message. Each app has its own registry, so
several nodes in one process (tests, embedding) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hubnode.dashboard_api import metrics_snapshot
from hubnode.node import Node

__all__ = ["LATENCY", "LATENCY_BUCKETS", "NodeCollector", "add_metrics"]

LATENCY = web.AppKey("hubnode.latency", Histogram)
"""The app's delivery-latency histogram, for readers other than /metrics (the dashboard)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class NodeCollector(Collector):
    """Reads a Node's counters (and its broker's and store's) at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node, c = self.node, self.node.counters
        yield GaugeMetricFamily("hubnode_connections", "Open WebSocket connections on this node",
                                value=len(node.conns))
        yield GaugeMetricFamily("hubnode_rooms_local", "Rooms with at least one member on this node",
                                value=node.local_room_count())
        yield GaugeMetricFamily("hubnode_ready", "1 when the node accepts clients", value=int(node.ready))
        yield _labelled("hubnode_client_frames", "Client frames received, by type", "type", c.frames)
        yield _labelled("hubnode_client_errors", "Error frames sent to clients, by code", "code", c.errors)
        yield _labelled("hubnode_control_commands", "Server-side control commands this node received and acted on, "
                        "by op", "op", c.control)
        yield _counter("hubnode_rate_limited_frames", "Client frames refused by the rate limit",
                       c.errors.get("rate_limited", 0))
        yield _counter("hubnode_messages_published", "Messages this node published", c.published)
        yield _counter("hubnode_messages_delivered", "Frames written to client sockets", c.delivered)
        yield _counter("hubnode_bytes_out", "Bytes of message frames written to sockets", c.bytes_out)
        yield _counter("hubnode_envelopes_dropped", "Broker payloads that did not decode", c.dropped)
        yield _counter("hubnode_resyncs_sent", "Resync notices sent, one per connection told (subscriber losses: "
                       "hubnode_redis_reconnects)", c.resyncs)
        yield _counter("hubnode_slow_consumer_closes", "Connections closed 1013 as slow consumers",
                       c.slow_closes)
        b = node.broker.counters
        yield _counter("hubnode_redis_reconnects", "Redis subscriber reconnections", b.reconnects)
        yield _counter("hubnode_redis_probe_failures", "Liveness probes that did not come back", b.probe_failures)
        yield _counter("hubnode_handoff_overflows", "Publications dropped by a full subscriber hand-off",
                       b.overflows)
        yield _counter("hubnode_oversized_envelopes", "Publications over --max-envelope-bytes, dropped",
                       b.oversized)
        yield _counter("hubnode_duplicate_envelopes", "Publications whose envelope id was already delivered",
                       c.duplicates)
        yield _counter("hubnode_reserved_type_drops", "Publications of a node-only type (ack, error, ...) dropped",
                       c.reserved)
        yield _counter("hubnode_heartbeat_failures", "Heartbeats that failed or timed out", c.heartbeat_failures)
        yield _counter("hubnode_metrics_snapshot_failures", "Metrics snapshots for the dashboard not stored in Redis",
                       c.metrics_failures)
        h = node.history
        yield _counter("hubnode_history_recoveries", "Streams this node read back after a subscriber loss or a gap",
                       h.recoveries)
        yield _counter("hubnode_history_recovered_messages",
                       "Messages delivered from history: node recoveries and clients' replays", h.recovered_messages)
        yield _counter("hubnode_history_unrecovered", "Stream recoveries that failed (members were sent resync)",
                       h.unrecovered)
        s = node.store.counters
        yield _counter("hubnode_membership_update_failures", "Membership writes that failed and were reconciled",
                       s.failed_updates)
        yield _counter("hubnode_nodes_swept", "Dead nodes this node swept from Redis", s.swept_nodes)
        yield _counter("hubnode_membership_registrations", "Full (re-)registrations of this node's members",
                       s.registrations)
        yield _labelled("hubnode_task_crashes", "Crashes of the node's supervised tasks, by task", "task",
                        dict(node.supervisor.crashes))


def add_metrics(app: web.Application, node: Node) -> None:
    """Serve /metrics for `node`, start observing delivery latency, and give the node the snapshot it
    stores every heartbeat in Redis mode, so any node can serve the cluster dashboard."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    latency = Histogram("hubnode_delivery_latency_seconds", "Publish to local delivery, from the envelope's ts",
                        buckets=LATENCY_BUCKETS, registry=registry)
    node.latency_observer = latency.observe
    node.metrics_source = partial(metrics_snapshot, node, latency)
    app[LATENCY] = latency

    async def metrics(_request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app.router.add_get("/metrics", metrics)
