"""The five measurements of the benchmark, each run against one System.

Every scenario starts its own Redis and nodes, connects a fleet of clients,
warms up, then measures over a window that opens just before the first
publish and closes when the last expected delivery arrived (or progress
stalled). CPU is read from /proc for the nodes, Redis, the client processes
and this controller (the publisher), so each figure comes with the proof that
the load generator was not the bottleneck.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from bench.loadgen import Fleet, Ready, Stats
from bench.procs import Cpu, cpu_of, machine_busy, nofile_limit
from bench.publish import Publisher
from bench.systems import Deployment, Item, System

__all__ = ["Context", "fanout", "idle", "latency", "point_to_point", "publish_cost", "storm"]

PAD = 60  # data {"seq":..,"t":..,"pad":"x"*PAD} is about 100 bytes of JSON
TEXT_BYTES = 2048  # fanout-2k: data {"seq":..,"t":..,"items":[...]} of about 2 KB of JSON
# fanout-2k's records: values drawn per message, so each message differs and deflate
# shrinks it about as much as an application's JSON (to ~1/3), unlike a run of one letter
WORDS = ("the", "room", "user", "message", "status", "online", "update", "price", "order", "ticket",
         "player", "score", "level", "match", "queue", "server", "client", "event", "value", "name",
         "time", "ok", "error", "retry", "item", "count", "total", "amount", "red", "green", "blue",
         "open", "closed", "pending", "done", "new", "old", "first", "last")
STATUSES = ("online", "away", "busy", "offline")
CONNECTS_IN_FLIGHT = 64  # per client process: the nodes listen with a backlog of 128


@dataclass
class Context:
    """What every scenario needs besides its System."""

    log_dir: Path
    client: str = "node"  # or "python"
    client_processes: int = 2
    timeout: float = 180.0  # upper bound on one wait for deliveries or connects

    def tag(self, scenario: str, system: System) -> str:
        return f"{scenario}-{system.name}"


class Probe(Protocol):
    """Something attached to the nodes while the measuring window is open (a profiler)."""

    async def start(self, dep: Deployment) -> None: ...

    async def stop(self) -> None: ...


def bench_data(seq: int) -> dict[str, Any]:
    return {"seq": seq, "t": time.monotonic(), "pad": "x" * PAD}


def bench_records(seq: int, size: int = TEXT_BYTES) -> dict[str, Any]:
    """Data whose JSON is about `size` bytes: a list of records drawn from a generator seeded with `seq`."""
    rng = random.Random(seq)
    items: list[dict[str, Any]] = []
    length = 150  # what the server's message adds (type, room, id, ts) and seq, t, "items"
    while True:
        item = {"id": rng.randrange(10**6), "user": f"u{rng.randrange(10**5)}", "status": rng.choice(STATUSES),
                "score": rng.randrange(10**4), "text": " ".join(rng.choices(WORDS, k=rng.randrange(2, 6)))}
        length += len(orjson.dumps(item)) + 1
        if length > size:
            break
        items.append(item)
    return {"seq": seq, "t": time.monotonic(), "items": items}


def _wchar(pids: Sequence[int]) -> int:
    """Bytes the processes have passed to write/send so far (/proc/<pid>/io wchar): their socket output."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
        except (OSError, StopIteration):
            pass
    return total


class Meter:
    """CPU of the nodes, Redis, the clients and the publisher over one window."""

    def __init__(self, dep: Deployment, fleet: Fleet) -> None:
        self.dep, self.fleet = dep, fleet
        self.start = self._read()
        self.t0 = time.monotonic()

    def _read(self) -> dict[str, Any]:
        nodes = Cpu()
        for pid in self.dep.node_pids:
            nodes = nodes + cpu_of(pid)
        return {"nodes": nodes,
                "redis": cpu_of(self.dep.redis.pid) if self.dep.redis else Cpu(),
                "clients": [p.cpu() for p in self.fleet.procs],
                "publisher": cpu_of(os.getpid()), "machine": machine_busy(),
                "wchar": _wchar(self.dep.node_pids)}

    def stop(self, end: float | None = None) -> dict[str, Any]:
        """The window's figures; `end` is when the last delivery arrived (default now)."""
        now = self._read()
        seconds = max(1e-9, (end or time.monotonic()) - self.t0)
        nodes = now["nodes"] - self.start["nodes"]
        clients = [b - a for a, b in zip(self.start["clients"], now["clients"], strict=True)]
        redis = (now["redis"] - self.start["redis"]).total
        publisher = (now["publisher"] - self.start["publisher"]).total
        ours = nodes.total + redis + sum(c.total for c in clients) + publisher
        machine = now["machine"] - self.start["machine"]
        return {
            # cores busy with anything but this benchmark: other users of a shared machine
            "other_load_cores": max(0.0, machine - ours) / max(1e-9, time.monotonic() - self.t0),
            "seconds": seconds,
            "server_cpu_s": nodes.total, "server_user_s": nodes.user, "server_sys_s": nodes.system,
            "redis_cpu_s": redis,
            "client_cpu_s": sum(c.total for c in clients),
            "client_max_core": max((c.total for c in clients), default=0.0) / seconds,
            "publisher_cpu_s": publisher,
            "server_write_bytes": now["wchar"] - self.start["wchar"],
        }


# -- shared steps ---------------------------------------------------------------

async def _start(system: System, ctx: Context, scenario: str, nodes: int, clients: int,
                 rooms: dict[str, Any] | None = None, latency: bool = False,
                 processes: int | None = None, addresses: list[str] | None = None
                 ) -> tuple[Deployment, Fleet]:
    tag = ctx.tag(scenario, system)
    dep = await asyncio.to_thread(system.start, nodes, ctx.log_dir, tag)
    try:
        fleet = await Fleet.start(kind=ctx.client, proto=system.proto, urls=dep.urls, total=clients,
                                  processes=processes or ctx.client_processes, log_dir=ctx.log_dir,
                                  tag=tag, rooms=rooms, local_addresses=addresses,
                                  concurrency=CONNECTS_IN_FLIGHT, latency=latency,
                                  deflate=system.deflate, msgpack=system.msgpack, timeout=ctx.timeout)
    except BaseException:
        await asyncio.to_thread(dep.stop)
        raise
    return dep, fleet


async def _stop(dep: Deployment, fleet: Fleet) -> None:
    await fleet.close()
    await asyncio.to_thread(dep.stop)


def _check_ready(ready: Ready, expected: int) -> None:
    if ready.connected != expected:
        raise RuntimeError(f"only {ready.connected}/{expected} clients connected: {ready.errors[:5]}")


async def warm_up(fleet: Fleet, pub: Publisher, system: System, timeout: float = 30.0) -> None:
    """Publish to everyone until every client got one; then wait for quiet."""
    end = time.monotonic() + timeout
    k = 0
    while True:
        await pub.publish([system.everyone({"w": k})])
        k += 1
        await asyncio.sleep(0.2)
        stats = await fleet.stats()
        if stats.warm_min >= 1:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"warm-up: some clients got nothing in {timeout:.0f}s")
    previous = -1
    while stats.warm_total != previous:
        previous = stats.warm_total
        await asyncio.sleep(0.3)
        stats = await fleet.stats()
    await fleet.reset()


async def wait_delivered(fleet: Fleet, expected: int, timeout: float, stall: float = 15.0,
                         count: Callable[[Stats], int] = lambda s: s.received, interval: float = 0.1) -> Stats:
    """Poll the clients until `count` (deliveries by default) reaches `expected`, `stall` s
    pass without progress, or timeout."""
    end = time.monotonic() + timeout
    previous, progressed = -1, time.monotonic()
    while True:
        stats = await fleet.stats()
        now = time.monotonic()
        if count(stats) >= expected:
            return stats
        if count(stats) != previous:
            previous, progressed = count(stats), now
        if now - progressed > stall or now > end:
            return stats
        await asyncio.sleep(interval)


def _compare(counts: Sequence[int], expected: Callable[[int], int]) -> tuple[int, int]:
    """(missing, duplicated) deliveries, client by client."""
    missing = duplicated = 0
    for i, got in enumerate(counts):
        want = expected(i)
        missing += max(0, want - got)
        duplicated += max(0, got - want)
    return missing, duplicated


async def _deliver(system: System, ctx: Context, scenario: str, *, nodes: int, clients: int,
                   rooms: dict[str, Any] | None, build: Callable[[int], Item], count: int,
                   expected: Callable[[int], int], rate: float = 0.0,
                   latency: bool = False, probe: Probe | None = None) -> dict[str, Any]:
    """Connect, warm up, publish `count` items (flood, or `rate` per second), count deliveries.

    A flood is built before the window opens; a paced item is built (and so
    timestamped) right when it is sent.
    """
    dep, fleet = await _start(system, ctx, scenario, nodes, clients, rooms, latency)
    pub = Publisher(dep)
    r = aioredis.from_url(dep.redis.url) if dep.redis is not None else None
    try:
        ready = await fleet.connect(ctx.timeout)
        _check_ready(ready, clients)
        await warm_up(fleet, pub, system)
        total = sum(expected(i) for i in range(clients))
        batch = [] if rate else [build(k) for k in range(count)]
        if probe is not None:
            await probe.start(dep)
        commands0 = await _command_stats(r) if r is not None else {}
        rusage0 = await _redis_rusage(r) if r is not None else 0.0
        meter = Meter(dep, fleet)
        if rate:
            await _paced(pub, build, count, rate)
        else:
            await pub.publish(batch)
        stats = await wait_delivered(fleet, total, ctx.timeout)
        window = meter.stop(stats.last or None)
        rusage = (await _redis_rusage(r) - rusage0) if r is not None else 0.0
        commands = _command_delta(commands0, await _command_stats(r)) if r is not None else {}
        if probe is not None:
            await probe.stop()
        full = await fleet.stats(full=True)
        dep.check()
    finally:
        if r is not None:
            await r.aclose()
        await pub.close()
        await _stop(dep, fleet)
    assert full.counts is not None
    missing, duplicated = _compare(full.counts, expected)
    delivered = full.received
    out: dict[str, Any] = {
        "system": system.name, "cluster": system.cluster, "nodes": len(dep.nodes),
        "clients": clients, "expected": total, "delivered": delivered,
        "missing": missing, "duplicated": duplicated,
        "deliveries_per_s": delivered / window["seconds"],
        "cpu_per_100k": window["server_cpu_s"] / max(1, delivered) * 1e5,
        "client_cpu_per_100k": window["client_cpu_s"] / max(1, delivered) * 1e5,
        "write_bytes_per_delivery": window["server_write_bytes"] / max(1, delivered),
        "closed_during_run": full.closed, "errors": full.errors[:5], **window,
        "publishes": count,
        # Redis: the server process's CPU from /proc (10 ms ticks), the same from its own
        # getrusage (INFO cpu, microseconds), and the time its commands ran (INFO commandstats)
        "redis_cpu_us_per_publish": window["redis_cpu_s"] / max(1, count) * 1e6,
        "redis_rusage_s": rusage,
        "redis_rusage_us_per_publish": rusage / max(1, count) * 1e6,
        "node_cpu_us_per_publish": window["server_cpu_s"] / max(1, count) * 1e6,
        "redis_cmd_us_per_publish": _top_level_usec(commands, count) / max(1, count),
        "redis_commands_by_name": {name: calls for name, (calls, _u) in
                                   sorted(commands.items(), key=lambda kv: -kv[1][0])},
    }
    if latency:
        out.update({"p50_ms": full.latency_ms(0.50), "p90_ms": full.latency_ms(0.90),
                    "p99_ms": full.latency_ms(0.99), "max_ms": full.lat_max,
                    "latency_samples": full.lat_count})
    return out


async def _paced(pub: Publisher, build: Callable[[int], Item], count: int, rate: float) -> None:
    """Publish one item per 1/rate seconds on a fixed schedule (no drift)."""
    t0 = time.monotonic()
    for k in range(count):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await pub.publish([build(k)])


# -- the scenarios ----------------------------------------------------------------

async def fanout(system: System, ctx: Context, clients: int, messages: int,
                 nodes: int = 2, probe: Probe | None = None, size: int | None = None) -> dict[str, Any]:
    """All clients in one room; `messages` published as fast as possible.

    `size`: messages of about that many bytes of varied records (`bench_records`,
    the fanout-2k scenario) instead of ~100 bytes of one letter.
    """
    data = bench_data if size is None else partial(bench_records, size=size)
    result = await _deliver(system, ctx, f"fanout{clients}" + (f"-{size}b" if size else ""),
                            nodes=nodes, clients=clients, rooms={"shared": ["room1"]},
                            build=lambda k: system.room("room1", data(k)), count=messages,
                            expected=lambda i: messages, probe=probe)
    result["messages"] = messages
    if size is not None:
        result["message_bytes"] = size
    return result


async def point_to_point(system: System, ctx: Context, clients: int, messages: int,
                         nodes: int = 2, seed: int = 6, probe: Probe | None = None
                         ) -> dict[str, Any]:
    """Each client its own user; `messages` sent to random users as fast as possible."""
    rng = random.Random(seed)
    targets = [rng.randrange(clients) for _ in range(messages)]
    per_user = [0] * clients
    for t in targets:
        per_user[t] += 1

    result = await _deliver(system, ctx, "p2p", nodes=nodes, clients=clients, rooms=None,
                            build=lambda k: system.user(f"u{targets[k]}", bench_data(k)),
                            count=messages, expected=lambda i: per_user[i], probe=probe)
    result["messages"] = messages
    return result


async def latency(system: System, ctx: Context, clients: int, rate: float, seconds: float,
                  nodes: int = 2) -> dict[str, Any]:
    """All clients in one room; `rate` messages/s for `seconds`, each stamped when sent."""
    messages = int(rate * seconds)
    result = await _deliver(system, ctx, "latency", nodes=nodes, clients=clients,
                            rooms={"shared": ["room1"]},
                            build=lambda k: system.room("room1", bench_data(k)), count=messages,
                            expected=lambda i: messages, rate=rate, latency=True)
    result.update({"messages": messages, "rate": rate, "duration_s": seconds})
    return result


async def publish_cost(system: System, ctx: Context, publishes: int, rooms: int = 10,
                       clients: int = 100, nodes: int = 2) -> dict[str, Any]:
    """`clients` spread over `rooms` rooms on 2 nodes; `publishes` flooded round-robin to the rooms.

    What one publish costs Redis (its process's CPU from /proc, and the time
    its commands ran) and the nodes. With 10 rooms and 20,000 publishes each
    room's history of 1,000 is full after the first half: the second half is
    the steady state, where every append also trims.
    """
    def per_room(r: int) -> int:
        return publishes // rooms + (1 if r < publishes % rooms else 0)

    result = await _deliver(system, ctx, "pubcost", nodes=nodes, clients=clients,
                            rooms={"mod": rooms, "modPrefix": "cost"},
                            build=lambda k: system.room(f"cost{k % rooms}", bench_data(k)),
                            count=publishes, expected=lambda i: per_room(i % rooms))
    result.update({"messages": publishes, "rooms": rooms})
    return result


def idle_capacity(requested: int) -> int:
    """How many connections one node process can hold under this machine's open-files limit."""
    return min(requested, nofile_limit() - 300)


async def idle(system: System, ctx: Context, clients: int) -> dict[str, Any]:
    """`clients` idle connections on one node, each joined to 2 rooms: RSS per connection and connect time."""
    n = idle_capacity(clients)
    per_process = 12_000  # each client process is under the same open-files limit
    processes = max(ctx.client_processes, math.ceil(n / per_process))
    # about 28k ephemeral ports per (source, destination) pair: past that, spread the
    # clients over 127.0.0.x (an explicit bind, so only when one address is not enough)
    sources = math.ceil(n / 25_000)
    addresses = [f"127.0.0.{k + 1}" for k in range(sources)] if sources > 1 else []
    # each client joins 2 rooms, as in the storm: membership is part of what a connection costs
    dep, fleet = await _start(system, ctx, f"idle{clients}", 1, n, processes=processes,
                              addresses=addresses, rooms={"shared": ["lobby"], "mod": 100, "modPrefix": "team"})
    try:
        await asyncio.sleep(1.0)  # let the node finish starting (imports, Redis pools)
        node = dep.nodes[0]
        rss0 = node.rss()
        meter = Meter(dep, fleet)
        ready = await fleet.connect(ctx.timeout * 2)
        window = meter.stop(ready.finished)
        _check_ready(ready, n)
        await asyncio.sleep(2.0)  # settle: late allocations, Redis replies
        rss1 = node.rss()
        stats = await fleet.stats()
        dep.check()
    finally:
        await _stop(dep, fleet)
    ms = sorted(ready.connect_ms)
    return {
        "system": system.name, "cluster": system.cluster, "requested": clients, "clients": n,
        "clamped": n < clients, "nofile_limit": nofile_limit(),
        "client_processes": processes, "source_addresses": max(1, len(addresses)),
        "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
        "bytes_per_conn": (rss1 - rss0) / n,
        "connect_all_s": ready.seconds,
        "connects_per_s": n / ready.seconds,
        "connect_p50_ms": _pct(ms, 0.5), "connect_p99_ms": _pct(ms, 0.99),
        "server_cpu_s": window["server_cpu_s"],
        "cpu_per_1k_connects": window["server_cpu_s"] / n * 1000,
        "redis_cpu_s": window["redis_cpu_s"], "client_cpu_s": window["client_cpu_s"],
        "client_max_core": window["client_max_core"], "closed_during_run": stats.closed,
        "other_load_cores": window["other_load_cores"],
    }


async def storm(system: System, ctx: Context, clients: int, nodes: int = 2,
                rooms: int = 100) -> dict[str, Any]:
    """`clients` connect at once and each joins "lobby" and one of `rooms` team rooms."""
    spec = {"shared": ["lobby"], "mod": rooms, "modPrefix": "team"}
    dep, fleet = await _start(system, ctx, "storm", nodes, clients, rooms=spec)
    try:
        if dep.redis is None:
            raise RuntimeError("the storm needs cluster mode (membership in Redis)")
        r = aioredis.from_url(dep.redis.url)
        stats0 = await _command_calls(r)
        meter = Meter(dep, fleet)
        ready = await fleet.connect(ctx.timeout * 2)
        window = meter.stop(ready.finished)
        stats1 = await _command_calls(r)
        by_command = {c: n - stats0.get(c, 0) for c, n in stats1.items() if n > stats0.get(c, 0)}
        commands = sum(by_command.values())
        _check_ready(ready, clients)
        members = await _lobby_members(r, system)
        await r.aclose()
        dep.check()
    finally:
        await _stop(dep, fleet)
    ms = sorted(ready.connect_ms)
    return {
        "system": system.name, "cluster": system.cluster, "nodes": nodes, "clients": clients,
        "rooms_per_client": 2, "all_joined_s": ready.seconds,
        "clients_per_s": clients / ready.seconds,
        "join_p50_ms": _pct(ms, 0.5), "join_p99_ms": _pct(ms, 0.99),
        "redis_cpu_s": window["redis_cpu_s"], "redis_commands": commands,
        "redis_commands_by_name": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
        "redis_cpu_per_1k_clients": window["redis_cpu_s"] / clients * 1000,
        "server_cpu_s": window["server_cpu_s"],
        "client_cpu_s": window["client_cpu_s"], "client_max_core": window["client_max_core"],
        "lobby_members_in_redis": members, "other_load_cores": window["other_load_cores"],
    }


async def _command_calls(r: aioredis.Redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), e.g. {"evalsha": 10000, ...}."""
    info = await r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


async def _command_stats(r: aioredis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, microseconds) per command so far (INFO commandstats)."""
    info = await r.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


def _command_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
                   ) -> dict[str, tuple[int, int]]:
    """What ran between two readings, less the INFO that took the first."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if name == "info":
            calls -= 1
        if calls > c0:
            out[name] = (calls - c0, usec - u0)
    return out


def _top_level_usec(commands: dict[str, tuple[int, int]], publishes: int) -> int:
    """Microseconds of the publishing commands: the scripts' when the publisher ran one per
    publish (a script's time includes the commands it calls, also counted under their own
    names), else PUBLISH's. The nodes' own scripts (heartbeats) are a few calls beside."""
    calls, usec = commands.get("evalsha", (0, 0))
    if calls >= publishes:
        return usec
    return commands.get("publish", (0, 0))[1]


async def _redis_rusage(r: aioredis.Redis) -> float:
    """redis-server's CPU-seconds so far, as its getrusage says (INFO cpu: microsecond resolution)."""
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _lobby_members(r: aioredis.Redis, system: System) -> int | None:
    """HLEN of the lobby's members hash (hubnode cluster mode keeps membership in Redis)."""
    if system.name != "hubnode" or not system.cluster:
        return None
    return int(await r.hlen("hub:members:{lobby}"))


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])
