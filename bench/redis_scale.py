"""`python -m bench.redis_scale`: hubnode on one Redis and on a 3-primary Redis Cluster, in one run.

What issue 14 asks of sharded pub/sub (SPUBLISH/SSUBSCRIBE), measured on this
machine over loopback, for each topology in turn:

- **p2p at saturation**, twice: every client in a room of its own (`rooms`),
  then every client addressed as its own user (`users`), so the channels
  cover thousands of hash slots. Messages go to random rooms (users) as fast
  as the system delivers them, for `--seconds`, with never more than
  `--window` sent but not yet delivered. Reported: delivered messages/s, and
  each Redis process's CPU over that time (INFO cpu: used_cpu_user +
  used_cpu_sys, with /proc/<pid>/stat beside it), per primary, with the
  spread (max/min over the primaries) of that CPU and of the publishes.
- **fan-out**: every client in one room, `--fanout-messages` flooded; node
  CPU-seconds (utime + stime from /proc) per 100,000 deliveries, which
  sharding should leave unchanged.

Each topology gets two nodes, started once and kept for its three
measurements, with the same flags (bench.systems.HubSystem's; history off
unless `--history-size`); the same load clients (a fresh fleet per
measurement, warmed up first) and the same publisher: this process, with one
pipelined connection per primary, each message sent to the
primary owning its channel's slot (SPUBLISH on the cluster, PUBLISH on one
Redis), as a cluster-aware worker would, without redis-py's cluster pipeline
between the benchmark and Redis. The cluster is deploy.redis_servers'
RedisClusterProcs: 3 primaries and 3 replicas, the replicas running as in
production (a sharded message reaches its shard's replica over the cluster
bus, and that CPU is reported too).

    .venv/bin/python -m bench.redis_scale --quick     # about 2 minutes on 2 cores
    .venv/bin/python -m bench.redis_scale             # more clients, 30 s windows
    .venv/bin/python -m bench.redis_scale --quick --history-size 1000

Writes bench/out/redis-scale-<time>.json and .md (and redis-scale-latest.*)
and prints the table. On a small machine every process (up to 6 Redis
servers, 2 nodes, the load clients and this publisher) shares the same cores:
"saturation" is the machine's, and the table's cores-busy line says who used
them. A cluster cannot deliver more than one Redis there; what it can show is
that the publishes and Redis's CPU split evenly over the shards, and that the
nodes pay the same per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.__main__ import log, wait_quiet
from bench.loadgen import Fleet, Stats, ensure_node_clients
from bench.procs import ROOT, Proc, cpu_of, free_port, machine_busy, wait_for
from bench.publish import BATCH, Publisher
from bench.report import environment
from bench.scenarios import (
    CONNECTS_IN_FLIGHT,
    Context,
    Meter,
    _check_ready,
    _compare,
    bench_data,
    wait_delivered,
    warm_up,
)
from bench.systems import Deployment, Eval, HubHistorySystem, HubSystem, Item, System, _listening
from deploy.redis_servers import HOST, SLOTS, RedisClusterProcs, RedisProcess, free_ports, key_slot

__all__ = ["FULL", "QUICK", "Sizes", "Topology", "main", "parse_args", "run", "table"]

NODES = 2
SEED = 14
POLL = 0.02  # seconds between two looks at the clients' counters while saturating
# A publish in INFO commandstats; a script's own SPUBLISH is counted there too, so a history publish
# (EVALSHA) is counted once, by the PUBLISH or SPUBLISH it runs
PUBLISH_COMMANDS = ("publish", "spublish")


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run."""

    clients: int  # p2p: each its own room (or user)
    seconds: float  # p2p: how long to saturate
    window: int  # p2p: most messages sent but not yet delivered
    fanout_clients: int
    fanout_messages: int


QUICK = Sizes(clients=2000, seconds=10.0, window=4000, fanout_clients=1000, fanout_messages=100)
FULL = Sizes(clients=4000, seconds=30.0, window=4000, fanout_clients=1000, fanout_messages=500)


# -- the Redis topologies ------------------------------------------------------------------

@dataclass
class Topology:
    """A running Redis topology: its processes, each one's role when it started, and who owns which slot."""

    name: str  # "single" or "cluster"
    label: str
    url: str  # hubnode's --redis-url
    sharded: bool
    procs: list[RedisProcess]
    roles: dict[str, str]
    primaries: list[RedisProcess]
    owner: bytes  # slot -> index into `primaries`
    stop: Callable[[], None] = field(repr=False)


def start_single(folder: Path) -> Topology:
    """One redis-server, as deploy.redis_servers starts it for the tests."""
    proc = RedisProcess("redis", free_port(), folder / "redis").start()
    return Topology("single", "one Redis", proc.url, False, [proc], {proc.name: "primary"}, [proc],
                    bytes(SLOTS), proc.stop)


def start_cluster(folder: Path) -> Topology:
    """3 primaries and 3 replicas (RedisClusterProcs), formed and in sync."""
    cluster = RedisClusterProcs(folder).start(timeout=60)
    try:
        primaries = cluster.primaries()
        owner = bytearray(SLOTS)
        for index, proc in enumerate(primaries):
            me = cluster.myself(proc)
            assert me is not None, f"{proc.name} stopped answering"
            for slot in me.slots:
                owner[slot] = index
        return Topology("cluster", f"Redis Cluster, {len(primaries)} primaries + "
                        f"{len(cluster.procs) - len(primaries)} replicas", cluster.url, True, cluster.procs,
                        cluster.roles(), primaries, bytes(owner), cluster.stop)
    except BaseException:
        cluster.stop()
        raise


TOPOLOGIES: dict[str, Callable[[Path], Topology]] = {"single": start_single, "cluster": start_cluster}


# -- hubnode on a topology, and its publisher -------------------------------------------------

def start_nodes(system: HubSystem, url: str, count: int, log_dir: Path, tag: str) -> Deployment:
    """`count` nodes of `system` on the Redis at `url` (which the deployment does not own or stop)."""
    ports = free_ports(count)
    nodes: list[Proc] = []
    try:
        for k, port in enumerate(ports):
            nodes.append(Proc(f"{tag}-node{k}", system.argv(port, url, k), log_dir, env={"PYTHONUNBUFFERED": "1"}))
        for node, port in zip(nodes, ports, strict=True):
            wait_for(partial(_listening, node, port), 30, f"{node.name} to listen")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return Deployment(system, None, nodes, [system.ws_url(p) for p in ports],
                      [f"http://{HOST}:{p}" for p in ports])


class HubOn(HubSystem):
    """hubnode, history off, on a Topology this module runs."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.topology = topology
        self.name = f"hubnode-{topology.name}"

    def start(self, nodes: int, log_dir: Path, tag: str) -> Deployment:
        return start_nodes(self, self.topology.url, nodes, log_dir, tag)


class HubHistoryOn(HubHistorySystem):
    """hubnode with `--history-size` on a Topology; on a cluster the history script publishes with SPUBLISH."""

    def __init__(self, topology: Topology, size: int) -> None:
        super().__init__(size)
        self.topology = topology
        self.name = f"hubnode-history-{topology.name}"

    def start(self, nodes: int, log_dir: Path, tag: str) -> Deployment:
        return start_nodes(self, self.topology.url, nodes, log_dir, tag)

    def _item(self, target: Any, msg: Any) -> Item:
        if target.kind == "all" or not self.topology.sharded:
            return super()._item(target, msg)
        from publisher.history import publish_call
        from publisher.targets import pack_for

        packed = pack_for(target, msg, "pub:bench", self.keys)
        call = publish_call(self.keys, target, packed.channel, packed.payload, packed.id, self.policy, sharded=True)
        return Eval(call.script.sha, call.script.text, tuple(call.keys), tuple(call.args))


def hub_on(topology: Topology, history_size: int) -> HubSystem:
    return HubHistoryOn(topology, history_size) if history_size else HubOn(topology)


def topology_of(system: System) -> Topology:
    assert isinstance(system, HubOn | HubHistoryOn), f"{system.name} runs on a Redis of its own"
    return system.topology


class ShardPublisher(Publisher):
    """bench.publish.Publisher for a Topology: a connection per primary, each item sent to its slot's owner.

    Items are grouped by primary and each group pipelined `BATCH` at a time
    (the groups concurrently), so a publisher keeps every shard busy at
    once. Order holds within a channel, not across shards. A history item
    (EVALSHA) goes to the owner of its keys, with its script loaded there once.
    """

    def __init__(self, dep: Deployment, topology: Topology) -> None:
        # Publisher.__init__ would connect to dep.redis: a Topology's deployment has none
        self.dep, self.redis, self.session = dep, None, None
        self.receivers = 0
        self.loaded = set()
        self.topology = topology
        self.shards = [aioredis.Redis(host=HOST, port=p.port) for p in topology.primaries]
        self.scripts: list[set[str]] = [set() for _ in self.shards]
        self.verb = "SPUBLISH" if topology.sharded else "PUBLISH"

    def _shard(self, item: Item) -> int:
        if len(self.shards) == 1:
            return 0
        key = item.keys[0] if isinstance(item, Eval) else item[0]
        return self.topology.owner[key_slot(key.encode())]

    async def publish(self, items: Sequence[Item]) -> list[Any]:
        """Send every item; the replies come grouped by shard, not in item order."""
        groups: dict[int, list[Item]] = {}
        for item in items:
            groups.setdefault(self._shard(item), []).append(item)
        parts = await asyncio.gather(*(self._send(shard, group) for shard, group in groups.items()))
        replies = [reply for part in parts for reply in part]
        self.receivers += sum(r[0] if isinstance(r, list) else r for r in replies)
        return replies

    async def _send(self, shard: int, items: list[Item]) -> list[Any]:
        client, replies = self.shards[shard], []
        for start in range(0, len(items), BATCH):
            pipe = client.pipeline(transaction=False)
            for item in items[start:start + BATCH]:
                if not isinstance(item, Eval):
                    pipe.execute_command(self.verb, *item)
                    continue
                if item.sha not in self.scripts[shard]:
                    await client.script_load(item.text)
                    self.scripts[shard].add(item.sha)
                pipe.evalsha(item.sha, len(item.keys), *item.keys, *item.args)
            replies.extend(await pipe.execute())
        return replies

    async def close(self) -> None:
        for client in self.shards:
            await client.aclose()


# -- Redis's side of a window ---------------------------------------------------------------

Reading = dict[str, tuple[float, float, int]]  # process -> (INFO cpu seconds, /proc seconds, publishes)


def read_redis(topology: Topology) -> Reading:
    """Every Redis process's CPU so far (its getrusage and /proc) and the publishing commands it ran."""
    out: Reading = {}
    for proc in topology.procs:
        assert proc.pid is not None, f"{proc.name} is not running"
        cpu, commands = proc.info("cpu"), proc.info("commandstats")
        calls = sum(int(commands.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in PUBLISH_COMMANDS)
        out[proc.name] = (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), cpu_of(proc.pid).total, calls)
    return out


def redis_window(topology: Topology, before: Reading, after: Reading) -> list[dict[str, Any]]:
    """One row per Redis process: its role and what it did between two readings."""
    primaries = {p.name for p in topology.primaries}
    rows = []
    for proc in topology.procs:
        (cpu0, proc0, calls0), (cpu1, proc1, calls1) = before[proc.name], after[proc.name]
        rows.append({"name": proc.name, "port": proc.port, "role": topology.roles.get(proc.name, "?"),
                     "primary": proc.name in primaries, "cpu_s": cpu1 - cpu0, "proc_cpu_s": proc1 - proc0,
                     "publishes": calls1 - calls0})
    return rows


def spread(values: Sequence[float]) -> float | None:
    """max/min of the primaries' figures (None with fewer than two, or a zero)."""
    if len(values) < 2 or min(values) <= 0:
        return None
    return max(values) / min(values)


class Busy:
    """The machine's busy CPU-seconds (every process, ours and others') from now on."""

    def __init__(self) -> None:
        self.busy0, self.t0 = machine_busy(), time.monotonic()

    def stop(self) -> tuple[float, float]:
        """(busy CPU-seconds, wall seconds) since this was made."""
        return machine_busy() - self.busy0, time.monotonic() - self.t0


def summarize(window: dict[str, Any], redis: list[dict[str, Any]], delivered: int,
              busy: tuple[float, float]) -> dict[str, Any]:
    """The figures every scenario reports: CPU per delivery, Redis per primary and the cores in use.

    Cores are CPU-seconds over the wall time of all the readings (which end a
    little after the window), so what is not ours is the other processes'.
    """
    primaries = [r for r in redis if r["primary"]]
    redis_cpu = sum(r["cpu_s"] for r in redis)
    machine, wall = busy
    cores = {"nodes": window["server_cpu_s"] / wall, "redis": redis_cpu / wall,
             "clients": window["client_cpu_s"] / wall, "publisher": window["publisher_cpu_s"] / wall}
    return {
        **window, "redis": redis, "redis_cpu_s": redis_cpu, "delivered": delivered,
        "deliveries_per_s": delivered / window["seconds"],
        "cpu_per_100k": window["server_cpu_s"] / max(1, delivered) * 1e5,
        "primary_cpu_s": [r["cpu_s"] for r in primaries],
        "primary_publishes": [r["publishes"] for r in primaries],
        "replica_cpu_s": [r["cpu_s"] for r in redis if not r["primary"]],
        "primary_cpu_spread": spread([r["cpu_s"] for r in primaries]),
        "primary_publish_spread": spread([r["publishes"] for r in primaries]),
        "cores": {**cores, "others": max(0.0, machine / wall - sum(cores.values()))},
    }


# -- the scenarios ---------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def connected(dep: Deployment, ctx: Context, scenario: str, clients: int,
                    rooms: dict[str, Any] | None) -> AsyncIterator[tuple[Fleet, ShardPublisher]]:
    """`clients` connected to the running nodes and joined, everyone warmed up; the clients closed on exit."""
    system = dep.system
    fleet = await Fleet.start(kind=ctx.client, proto=system.proto, urls=dep.urls, total=clients,
                              processes=ctx.client_processes, log_dir=ctx.log_dir, tag=f"{system.name}-{scenario}",
                              rooms=rooms, concurrency=CONNECTS_IN_FLIGHT, timeout=ctx.timeout)
    pub = ShardPublisher(dep, topology_of(system))
    try:
        _check_ready(await fleet.connect(ctx.timeout), clients)
        await warm_up(fleet, pub, system)
        yield fleet, pub
        dep.check()
    finally:
        await pub.close()
        await fleet.close()


async def saturate(fleet: Fleet, pub: Publisher, build: Callable[[int], Item], seconds: float,
                   window: int) -> tuple[int, Stats]:
    """Publish for `seconds` as fast as deliveries keep up: never more than `window` sent and undelivered.

    A watcher reads the clients' counters every POLL seconds while the
    publisher sends batches of at most 4 * BATCH. Returns the messages sent
    and the clients' counters when the time was up.
    """
    seen, done = 0, False

    async def watch() -> None:
        nonlocal seen
        while not done:
            seen = (await fleet.stats()).received
            await asyncio.sleep(POLL)

    watcher = asyncio.create_task(watch())
    sent, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end and not watcher.done():
            room = min(window - (sent - seen), 4 * BATCH)
            if room < BATCH // 4:
                await asyncio.sleep(POLL / 4)
                continue
            await pub.publish([build(sent + k) for k in range(room)])
            sent += room
    finally:
        done = True
        await watcher
    return sent, await fleet.stats()


async def p2p(dep: Deployment, ctx: Context, sizes: Sizes, kind: str) -> dict[str, Any]:
    """Each client its own room (`kind` "rooms") or user ("users"); saturate with messages to random ones."""
    system, topology = dep.system, topology_of(dep.system)
    n, rng = sizes.clients, random.Random(SEED)
    per_client = [0] * n

    def build(k: int) -> Item:
        i = rng.randrange(n)
        per_client[i] += 1
        return system.room(f"p{i}", bench_data(k)) if kind == "rooms" else system.user(f"u{i}", bench_data(k))

    rooms = {"mod": n, "modPrefix": "p"} if kind == "rooms" else None
    async with connected(dep, ctx, f"p2p-{kind}", n, rooms) as (fleet, pub):
        before = await asyncio.to_thread(read_redis, topology)
        busy, meter = Busy(), Meter(dep, fleet)
        sent, stats = await saturate(fleet, pub, build, sizes.seconds, sizes.window)
        window, after = meter.stop(), await asyncio.to_thread(read_redis, topology)
        redis, machine = redis_window(topology, before, after), busy.stop()
        await wait_delivered(fleet, sent, ctx.timeout, stall=10)
        full = await fleet.stats(full=True)
    assert full.counts is not None
    missing, duplicated = _compare(full.counts, lambda i: per_client[i])
    return {"scenario": f"p2p_{kind}", "clients": n, "window": sizes.window, "published": sent,
            "published_per_s": sent / window["seconds"], "missing": missing, "duplicated": duplicated,
            "closed_during_run": full.closed, "errors": full.errors[:5],
            **summarize(window, redis, stats.received, machine)}


async def fanout(dep: Deployment, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """Every client in one room; `fanout_messages` flooded to it."""
    system, topology = dep.system, topology_of(dep.system)
    n, m = sizes.fanout_clients, sizes.fanout_messages
    async with connected(dep, ctx, "fanout", n, {"shared": ["fan"]}) as (fleet, pub):
        batch = [system.room("fan", bench_data(k)) for k in range(m)]
        before = await asyncio.to_thread(read_redis, topology)
        busy, meter = Busy(), Meter(dep, fleet)
        await pub.publish(batch)
        stats = await wait_delivered(fleet, n * m, ctx.timeout)
        window, after = meter.stop(stats.last or None), await asyncio.to_thread(read_redis, topology)
        redis, machine = redis_window(topology, before, after), busy.stop()
        full = await fleet.stats(full=True)
    assert full.counts is not None
    missing, duplicated = _compare(full.counts, lambda _i: m)
    return {"scenario": "fanout", "clients": n, "messages": m, "expected": n * m, "missing": missing,
            "duplicated": duplicated, "closed_during_run": full.closed, "errors": full.errors[:5],
            **summarize(window, redis, full.received, machine)}


# -- the run ------------------------------------------------------------------------------

async def run_topology(name: str, args: argparse.Namespace, sizes: Sizes, ctx: Context) -> dict[str, Any]:
    """Start one topology and two nodes on it, run the three measurements, stop everything."""
    log(f"starting {name} Redis and {NODES} nodes ...")
    topology = await asyncio.to_thread(TOPOLOGIES[name], ctx.log_dir / f"redis-{name}")
    out: dict[str, Any] = {"label": topology.label, "url": topology.url, "roles": topology.roles,
                           "pids": {p.name: p.pid for p in topology.procs}}
    try:
        system = hub_on(topology, args.history_size)
        try:
            dep = await asyncio.to_thread(system.start, NODES, ctx.log_dir, system.name)
        except Exception as exc:
            out["error"] = f"the nodes did not start: {type(exc).__name__}: {exc}"
            log(out["error"])
            return out
        try:
            await run_jobs(dep, args, sizes, ctx, out)
        finally:
            await asyncio.to_thread(dep.stop)
    finally:
        await asyncio.to_thread(topology.stop)
    return out


async def run_jobs(dep: Deployment, args: argparse.Namespace, sizes: Sizes, ctx: Context, out: dict[str, Any]) -> None:
    """p2p with rooms, p2p with users, fan-out, on the running nodes; each one's row into `out`."""
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("p2p_rooms", partial(p2p, dep, ctx, sizes, "rooms")),
        ("p2p_users", partial(p2p, dep, ctx, sizes, "users")),
        ("fanout", partial(fanout, dep, ctx, sizes))]
    for scenario, job in jobs:
        load = await asyncio.to_thread(wait_quiet, args.quiet_below, args.quiet_wait) if args.quiet_wait else None
        log(f"{scenario} on {out['label']}" + (f" (other load {load:.2f} cores)" if load is not None else ""))
        try:
            row = await job()
        except Exception as exc:  # one failure must not lose the rest of the run
            row = {"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}
        row["background_before_cores"] = load
        out[scenario] = row
        log(f"  {headline(row)}")


def headline(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED: {row['error']}"
    cpu = " / ".join(f"{c:.2f}" for c in row["primary_cpu_s"])
    return (f"{row['delivered']:,} delivered, {row['deliveries_per_s']:,.0f}/s, nodes {row['cpu_per_100k']:.2f} "
            f"CPU-s/100k, Redis primaries {cpu} CPU-s, lost {row['missing'] + row['duplicated']}")


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in asdict(base) if getattr(args, k) is not None}
    return replace(base, **given)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every topology named in `args.topologies`, one after the other; the report as a dict."""
    sizes = sizes_of(args)
    if args.client == "node":
        ensure_node_clients()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = Context(log_dir=args.out / "logs" / f"redis-scale-{stamp}", client=args.client,
                  client_processes=args.client_processes)
    started = time.monotonic()
    results = {name: await run_topology(name, args, sizes, ctx) for name in args.topologies}
    return {"command": "python -m bench.redis_scale " + shlex.join(args.argv), "started": stamp,
            "mode": "quick" if args.quick else "full", "elapsed_s": time.monotonic() - started,
            "sizes": asdict(sizes), "history_size": args.history_size, "nodes": NODES,
            "environment": environment(), "results": results}


# -- the report -----------------------------------------------------------------------------

def _cell(row: dict[str, Any] | None, fmt: Callable[[dict[str, Any]], str]) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "FAILED"
    return fmt(row)


def _each(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(f"{v:,.{digits}f}" for v in values) or "-"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


Line = tuple[str, Callable[[dict[str, Any]], str]]
CORES: Line = ("cores busy: nodes / Redis / clients / publisher / other processes", lambda r: _each(
    [r["cores"][k] for k in ("nodes", "redis", "clients", "publisher", "others")]))
P2P_LINES: list[Line] = [
    ("delivered msg/s", lambda r: f"{r['deliveries_per_s']:,.0f}"),
    ("lost + duplicated (after draining)", lambda r: f"{r['missing'] + r['duplicated']:,}"),
    ("Redis CPU-s per primary (INFO cpu)", lambda r: _each(r["primary_cpu_s"])),
    ("spread of primaries' CPU, max/min", lambda r: _ratio(r["primary_cpu_spread"])),
    ("publishes per primary", lambda r: _each(r["primary_publishes"], 0)),
    ("spread of publishes, max/min", lambda r: _ratio(r["primary_publish_spread"])),
    ("Redis CPU-us per publish, per primary", lambda r: _each(
        [c / max(1, p) * 1e6 for c, p in zip(r["primary_cpu_s"], r["primary_publishes"], strict=True)], 1)),
    ("Redis CPU-s of replicas", lambda r: _each(r["replica_cpu_s"])),
    ("node CPU-s per 100k deliveries", lambda r: f"{r['cpu_per_100k']:.2f}"),
    CORES,
]
FANOUT_LINES: list[Line] = [
    ("node CPU-s per 100k deliveries", lambda r: f"{r['cpu_per_100k']:.2f}"),
    ("delivered / expected", lambda r: f"{r['delivered']:,} / {r['expected']:,}"),
    ("lost + duplicated", lambda r: f"{r['missing'] + r['duplicated']:,}"),
    ("deliveries/s", lambda r: f"{r['deliveries_per_s']:,.0f}"),
    ("node CPU-s (user + sys)", lambda r: f"{r['server_cpu_s']:.2f} ({r['server_user_s']:.2f} + "
                                          f"{r['server_sys_s']:.2f})"),
    ("Redis CPU-s per primary", lambda r: _each(r["primary_cpu_s"])),
    CORES,
]


def table(report: dict[str, Any]) -> str:
    """The Markdown report: one column per topology."""
    results: dict[str, dict[str, Any]] = report["results"]
    names = list(results)
    s = report["sizes"]
    head = ["| | " + " | ".join(results[n]["label"] for n in names) + " |", "|---|" + "---:|" * len(names)]
    history = f"history size {report['history_size']}" if report["history_size"] else "history off"
    lines = [f"# hubnode on one Redis and on a Redis Cluster ({report['mode']} run)", "",
             f"`{report['command']}`, {report['started']}, {report['elapsed_s']:.0f} s; {report['nodes']} nodes, "
             f"{history}; hubnode at `{report['environment']['git']['revision']}`.", ""]
    sections = [("p2p_rooms", f"p2p at saturation, rooms: {s['clients']:,} clients each in its own room, "
                              f"{s['seconds']:g} s, at most {s['window']:,} undelivered", P2P_LINES),
                ("p2p_users", f"p2p at saturation, users: {s['clients']:,} clients each its own user, "
                              f"{s['seconds']:g} s, at most {s['window']:,} undelivered", P2P_LINES),
                ("fanout", f"fan-out: {s['fanout_clients']:,} clients in one room, "
                           f"{s['fanout_messages']:,} messages", FANOUT_LINES)]
    for key, title, rows in sections:
        lines += [f"## {title}", "", *head]
        for label, fmt in rows:
            lines.append(f"| {label} | " + " | ".join(_cell(results[n].get(key), fmt) for n in names) + " |")
        failed = [f"{n}: {results[n][key]['error']}" for n in names if "error" in results[n].get(key, {})]
        lines += [*(f"- FAILED {f}" for f in failed), ""]
    lines += ["Redis CPU is used_cpu_user + used_cpu_sys (INFO cpu) over the window; /proc/<pid>/stat gives the "
              "same in 10 ms ticks (`proc_cpu_s` in the JSON). Publishes are the PUBLISH/SPUBLISH calls of INFO "
              "commandstats (with history, those the publish script makes). Node CPU is utime + stime of both "
              "node processes from /proc.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.redis_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short sizes (about 2 minutes)")
    p.add_argument("--topologies", default="single,cluster", help="comma-separated, from single, cluster")
    p.add_argument("--clients", type=int, help=f"p2p clients (quick {QUICK.clients}, else {FULL.clients})")
    p.add_argument("--seconds", type=float,
                   help=f"p2p saturation time (quick {QUICK.seconds:g}, else {FULL.seconds:g})")
    p.add_argument("--window", type=int, help=f"p2p: most messages undelivered at once ({QUICK.window})")
    p.add_argument("--fanout-clients", type=int, help=f"fan-out clients ({QUICK.fanout_clients})")
    p.add_argument("--fanout-messages", type=int,
                   help=f"fan-out messages (quick {QUICK.fanout_messages}, else {FULL.fanout_messages})")
    p.add_argument("--history-size", type=int, default=0, help="the nodes' --history-size (default 0: off)")
    p.add_argument("--client", choices=("node", "python"), default="node",
                   help="load generator: Node.js ws (default) or aiohttp (slow; the smoke test's)")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--quiet-below", type=float, default=0.3, metavar="CORES",
                   help="before each measurement wait until other processes use less (0.3)")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SECONDS",
                   help="longest such wait (10; 0: do not look)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    unknown = set(args.topologies) - set(TOPOLOGIES)
    if unknown or not args.topologies:
        p.error(f"--topologies: expected some of {', '.join(TOPOLOGIES)}")
    return args


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """The JSON and the Markdown, under their own names and as redis-scale-latest.*."""
    out.mkdir(parents=True, exist_ok=True)
    text, md = json.dumps(report, indent=1, default=str), table(report)
    json_path, md_path = out / f"redis-scale-{report['started']}.json", out / f"redis-scale-{report['started']}.md"
    for path, body in ((json_path, text), (md_path, md), (out / "redis-scale-latest.json", text),
                       (out / "redis-scale-latest.md", md)):
        path.write_text(body)
    return json_path, md_path


def failures(report: dict[str, Any]) -> list[str]:
    """Every failed scenario and every lost or duplicated message, one line each."""
    out = []
    for name, result in report["results"].items():
        if "error" in result:
            out.append(f"{name}: {result['error']}")
        for key in ("p2p_rooms", "p2p_users", "fanout"):
            row = result.get(key, {})
            if "error" in row:
                out.append(f"{name} {key}: {row['error']}")
            elif row and row["missing"] + row["duplicated"]:
                out.append(f"{name} {key}: {row['missing']} missing, {row['duplicated']} duplicated")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    json_path, md_path = write(report, args.out)
    print(table(report))
    log(f"wrote {json_path}, {md_path}")
    problems = failures(report)
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
