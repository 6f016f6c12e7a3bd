"""Capacity: 50,000 concurrent connections over 3 nodes of one system, on this machine.

One private redis-server and 3 nodes (hubnode with `--max-connections 19000`
passed explicitly; Node.js Socket.IO as 3 `sio_node.js` processes on the
Redis adapter; any other system alike); the clients are spread evenly over the
nodes (client i goes to node i mod 3), over several load-generating processes
(each under the same open-files limit as a node: at most `PER_PROCESS` clients
each) and over several source addresses 127.0.0.2, 127.0.0.3, ... (the Node
client binds each socket to one: an explicit bind takes a port from the
address's ~28k ephemeral ports whatever the destination, so at most
`PER_ADDRESS` clients per address). The Python client (`--client python`)
binds no source address.

Reported: how many connected of how many, the time until all of them were
connected (first connect started to last one joined), each node's RSS before
and after (VmRSS, and its peak VmHWM) and per connection it holds, the
connections each node holds as the kernel sees them (ESTABLISHED in
/proc/net/tcp on its port), how many of them one message to everyone reached
(proof the sockets are live, not half-open), and CPU over the connect window.

    python -m bench --only capacity --systems hubnode,socketio-node
    python -m bench --only capacity --capacity-clients 3000
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import redis.asyncio as aioredis

from bench.loadgen import Fleet, Stats
from bench.procs import nofile_limit
from bench.publish import Publisher
from bench.scenarios import CONNECTS_IN_FLIGHT, Context, Meter, _pct, wait_delivered
from bench.systems import Deployment, Item, System

__all__ = ["HUB_MAX_CONNECTIONS", "NODES", "PER_ADDRESS", "PER_PROCESS", "capacity", "established"]

NODES = 3
HUB_MAX_CONNECTIONS = 19_000  # hubnode's --max-connections, passed explicitly (its default may change)
PER_PROCESS = 10_000  # clients per load-generating process (open-files limit 20,000 each)
PER_ADDRESS = 20_000  # clients per source address (~28k ephemeral ports each, with a margin)
IN_FLIGHT_PER_NODE = 96  # connects in flight over all client processes, per node (listen backlog 128)
SETTLE_S = 3.0  # after the last connect, before RSS is read: late allocations, Redis replies


class Capped(System):
    """`inner` with its nodes' `--max-connections` set to `cap` (only where the flag is given)."""

    def __init__(self, inner: System, cap: int) -> None:
        self.inner, self.cap = inner, cap
        self.name, self.label, self.proto = inner.name, inner.label, inner.proto
        self.cluster, self.deflate = inner.cluster, inner.deflate
        self.flagged = "--max-connections" in inner.argv(0, "redis://127.0.0.1:1/0", 0)

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        argv = list(self.inner.argv(port, redis_url, index))
        if "--max-connections" in argv:
            argv[argv.index("--max-connections") + 1] = str(self.cap)
        return argv

    def ws_url(self, port: int) -> str:
        return self.inner.ws_url(port)

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self.inner.room(room, data, mtype)

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self.inner.user(user, data, mtype)

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        return self.inner.everyone(data, mtype)


def established(ports: list[int], host: str = "127.0.0.1") -> list[int]:
    """TCP connections in ESTABLISHED whose local end is host:port, for each port (/proc/net/tcp)."""
    a, b, c, d = (int(x) for x in host.split("."))
    hexhost = f"{d:02X}{c:02X}{b:02X}{a:02X}"  # little-endian, as the kernel prints it
    wanted = {f"{hexhost}:{p:04X}": k for k, p in enumerate(ports)}
    counts = [0] * len(ports)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            if fields[3] == "01" and (k := wanted.get(fields[1])) is not None:
                counts[k] += 1
    return counts


def _hwm_of(pid: int) -> int:
    """Peak resident set size of `pid` in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def _reach(fleet: Fleet, pub: Publisher, system: System, connected: int,
                 timeout: float = 60.0, stall: float = 10.0) -> Stats:
    """Publish one message to everyone; wait until `connected` clients counted it (or it stalls)."""
    await pub.publish([system.everyone({"w": 0})])
    return await wait_delivered(fleet, connected, timeout, stall, count=lambda s: s.warm_total, interval=0.2)


async def _redis_used(r: aioredis.Redis) -> int:
    """Bytes Redis holds in keys and values (INFO memory used_memory_dataset: without client buffers)."""
    return int((await r.info("memory"))["used_memory_dataset"])


async def capacity(system: System, ctx: Context, clients: int, nodes: int = NODES) -> dict[str, Any]:
    """`clients` idle connections spread evenly over `nodes` nodes: connect time and RSS per node."""
    cap = min(HUB_MAX_CONNECTIONS, nofile_limit() - 500)  # what one node process may hold
    n = min(clients, cap * nodes)
    capped = Capped(system, cap)
    if not capped.cluster:
        raise RuntimeError("capacity needs cluster mode (several nodes on one Redis)")
    processes = max(ctx.client_processes, math.ceil(n / PER_PROCESS))
    sources = max(2, math.ceil(n / PER_ADDRESS))
    addresses = [f"127.0.0.{k + 2}" for k in range(sources)]
    concurrency = max(8, min(CONNECTS_IN_FLIGHT, IN_FLIGHT_PER_NODE * nodes // processes))
    tag = ctx.tag(f"capacity{clients}", system)
    dep: Deployment = await asyncio.to_thread(capped.start, nodes, ctx.log_dir, tag)
    try:
        fleet = await Fleet.start(kind=ctx.client, proto=system.proto, urls=dep.urls, total=n,
                                  processes=processes, log_dir=ctx.log_dir, tag=tag,
                                  local_addresses=addresses, concurrency=concurrency,
                                  deflate=system.deflate, timeout=ctx.timeout)
    except BaseException:
        await asyncio.to_thread(dep.stop)
        raise
    assert dep.redis is not None
    pub: Publisher | None = None
    r = aioredis.from_url(dep.redis.url)
    try:
        pub = Publisher(dep)
        await asyncio.sleep(1.0)  # let the nodes finish starting (imports, Redis pools)
        rss0 = [node.rss() for node in dep.nodes]
        redis0 = await _redis_used(r)
        meter = Meter(dep, fleet)
        ready = await fleet.connect(max(ctx.timeout * 2, n / 150))
        window = meter.stop(ready.finished)
        await asyncio.sleep(SETTLE_S)
        rss1 = [node.rss() for node in dep.nodes]
        hwm = [_hwm_of(node.pid) for node in dep.nodes]
        redis1 = await _redis_used(r)
        redis_rss = dep.redis.proc.rss()
        by_node = await asyncio.to_thread(established, [_port(u) for u in dep.urls])
        reached = await _reach(fleet, pub, system, ready.connected)
        dep.check()
    finally:
        await r.aclose()
        if pub is not None:
            await pub.close()
        await fleet.close()
        await asyncio.to_thread(dep.stop)
    ms = sorted(ready.connect_ms)
    deltas = [after - before for before, after in zip(rss0, rss1, strict=True)]
    return {
        "system": system.name, "cluster": system.cluster, "nodes": nodes,
        "requested": clients, "clients": n, "clamped": n < clients,
        "connected": ready.connected, "failed": ready.failed, "errors": ready.errors[:5],
        "all_connected": ready.connected == n,
        "connected_by_node": by_node, "reached_by_broadcast": reached.warm_total,
        "closed_during_run": reached.closed,
        "max_connections_flag": cap if capped.flagged else None, "nofile_limit": nofile_limit(),
        "client": ctx.client, "client_processes": processes,
        "source_addresses": len(addresses) if ctx.client == "node" else 1,
        "connects_in_flight": concurrency * processes,
        "connect_all_s": ready.seconds, "connects_per_s": ready.connected / max(1e-9, ready.seconds),
        "connect_p50_ms": _pct(ms, 0.5), "connect_p99_ms": _pct(ms, 0.99),
        "rss_before_mb": [b / 2**20 for b in rss0], "rss_after_mb": [b / 2**20 for b in rss1],
        "rss_peak_mb": [b / 2**20 for b in hwm], "rss_total_mb": sum(rss1) / 2**20,
        "bytes_per_conn": sum(deltas) / max(1, ready.connected),
        "bytes_per_conn_by_node": [d / c if c else float("nan") for d, c in zip(deltas, by_node, strict=True)],
        "redis_dataset_mb_before": redis0 / 2**20, "redis_dataset_mb_after": redis1 / 2**20,
        "redis_bytes_per_conn": (redis1 - redis0) / max(1, ready.connected),
        "redis_rss_mb": redis_rss / 2**20,
        "server_cpu_s": window["server_cpu_s"],
        "cpu_per_1k_connects": window["server_cpu_s"] / max(1, ready.connected) * 1000,
        "redis_cpu_s": window["redis_cpu_s"], "client_cpu_s": window["client_cpu_s"],
        "client_max_core": window["client_max_core"], "other_load_cores": window["other_load_cores"],
    }
