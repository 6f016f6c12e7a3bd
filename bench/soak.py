"""Soak run: hours of traffic in ten minutes, then every client leaves at once.

    .venv/bin/python -m bench --soak                     # both variants, 20,000 clients, 10 min each
    .venv/bin/python -m bench --soak --soak-history      # only the one with history (and the kills)
    .venv/bin/python -m bench --soak --soak-history off --soak-minutes 1 --soak-clients 2000

Three hubnode nodes on one private redis-server; `--soak-clients` WebSocket
clients (bench/client/soak.js, Node.js, spread over several processes and
over the nodes), each with a user id and `--soak-rooms-per-client` of
`--soak-rooms` rooms. An external publisher (bench/publish.py, through Redis)
sends `--soak-rate` messages a second, mixed room / user / all by the weights
of `--soak-mix` (default 300:299:1: one message to everyone a second at 600/s,
since each of those is 20,000 deliveries), for `--soak-minutes`. The publisher
numbers each stream's messages (data.s = 1, 2, ... per room, per user and for
`all`), so the clients count what they got without a list of what was sent:
per kind, delivered (distinct), duplicated and lost = expected - delivered,
where expected is what each stream got times its members.

Then every client sends its close frame in the same instant, and the run
watches Redis until the per-connection and membership keys (members,
presence, online, node conns/rooms/users) are gone, or a deadline passes, and
reports every key left, by pattern.

Variants (`--soak-history off|on|both`, default both, one after the other):

- `off`: the `hubnode` system, nothing goes wrong: nothing may be lost.
- `on`: the `hubnode-history` system (`--history-size 1000`, the publisher
  appends through the history script); at 40 % of the run one node gets
  SIGKILL (its clients reconnect to the others with `?since=` and rejoin with
  `since`), at 60 % another node's Redis subscriber connection is killed
  (CLIENT KILL ... TYPE pubsub; bench/chaos.py's steps). Nothing may be lost on
  room and user streams (they have history); messages to `all` have none, so
  the clients that were reconnecting miss some: reported, not a failure.

Per interval (`--soak-interval`, 60 s): publish-to-delivery p50/p99/max, node
RSS and CPU, Redis used_memory, clients joined. Writes bench/out/SOAK.md,
bench/out/soak-<time>.json (and soak-latest.json) and prints a summary; exits
1 when something was lost where it may not be, duplicated, a client never
joined, or a membership key outlived its clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.chaos import Clients, _drain, _node_metrics, chaos_events
from bench.chaosclient import rooms_of
from bench.loadgen import BENCH_DIR, ClientProc, ensure_node_clients, percentile_of_hist
from bench.procs import ROOT, Cpu, cpu_of, rss_of
from bench.publish import Publisher
from bench.report import environment
from bench.systems import Deployment, HubHistorySystem, HubSystem, Item, hub_cluster_available

__all__ = ["add_arguments", "main", "run", "summary"]

SOAK_JS = BENCH_DIR / "client" / "soak.js"
MTYPE = "soak"
KINDS = ("room", "user", "all")
PER_PROCESS = 5000  # clients per load process by default (the open-files limit is 20,000)
SOCKETS_PER_ADDRESS = 15_000  # above this, a process spreads over source addresses 127.0.0.x
TICK = 0.02  # the publisher sends what is due every TICK seconds, pipelined
KILL_AT, BLIP_AT = 0.4, 0.6  # fractions of the run (history variant)
# Keys that exist only while connections do (docs/redis.md), and those that stay.
MEMBERSHIP = ("members:{*}", "presence:{*}", "online:{*}", "rooms",
              "node:{*}:conns", "node:{*}:rooms", "node:{*}:users")
REGISTRY = ("nodes", "node:{*}", "node:{*}:metrics")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The soak flags, for `python -m bench` (which adds `--out`) and `python -m bench.soak`."""
    g = p.add_argument_group("soak run (--soak; see bench/soak.py)")
    g.add_argument("--soak", action="store_true",
                   help="the soak run instead of the benchmark: 3 nodes, many clients, minutes of traffic")
    g.add_argument("--soak-minutes", type=float, default=10.0, metavar="MIN",
                   help="minutes of publishing per variant (10)")
    g.add_argument("--soak-clients", type=int, default=20_000, metavar="N", help="WebSocket clients (20,000)")
    g.add_argument("--soak-rate", type=float, default=600.0, metavar="MSG_PER_S",
                   help="published messages per second (600)")
    g.add_argument("--soak-history", nargs="?", const="on", default="both", choices=("off", "on", "both"),
                   help="which variant: off (no history, no faults), on (history, a node SIGKILLed and a "
                        "subscriber killed) or both, one after the other (default; bare flag: on)")
    g.add_argument("--soak-mix", default="300:299:1", metavar="ROOM:USER:ALL",
                   help="weights of room, user and all messages (300:299:1)")
    g.add_argument("--soak-rooms", type=int, default=2000, metavar="N", help="rooms in all (2,000)")
    g.add_argument("--soak-rooms-per-client", type=int, default=2, metavar="N")
    g.add_argument("--soak-nodes", type=int, default=3, metavar="N")
    g.add_argument("--soak-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds per row of the latency / memory table (60)")
    g.add_argument("--soak-processes", type=int, default=0, metavar="N",
                   help=f"load client processes (0: one per {PER_PROCESS:,} clients, at least 2)")
    g.add_argument("--soak-seed", type=int, default=7, metavar="N")


@dataclass(frozen=True)
class Plan:
    """The sizes of one soak run (both variants)."""

    seconds: float
    clients: int
    rate: float
    mix: tuple[float, float, float]
    rooms: int
    rooms_per_client: int
    nodes: int
    interval: float
    processes: int
    seed: int

    @property
    def intervals(self) -> int:
        """Rows of the per-interval table (the last may be shorter)."""
        return max(1, math.ceil(self.seconds / self.interval - 1e-9))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        try:
            mix = tuple(float(x) for x in args.soak_mix.split(":"))
        except ValueError:
            mix = ()
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise SystemExit(f"--soak-mix {args.soak_mix!r}: expected three weights ROOM:USER:ALL")
        if args.soak_nodes < 2:
            raise SystemExit("--soak-nodes must be at least 2 (the history variant kills one)")
        clients = args.soak_clients
        processes = args.soak_processes or max(2, math.ceil(clients / PER_PROCESS))
        return cls(seconds=args.soak_minutes * 60, clients=clients, rate=args.soak_rate,
                   mix=(mix[0], mix[1], mix[2]), rooms=args.soak_rooms,
                   rooms_per_client=args.soak_rooms_per_client, nodes=args.soak_nodes,
                   interval=args.soak_interval, processes=max(1, min(processes, clients)), seed=args.soak_seed)


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the publisher ------------------------------------------------------------------------

class Published:
    """What was published, per stream: the next data.s of each, and so the deliveries owed."""

    def __init__(self) -> None:
        self.rooms = Counter[str]()
        self.users = Counter[str]()
        self.all = 0
        self.lag_max = 0.0  # how far the publisher fell behind its schedule, seconds

    def next(self, kind: str, name: str) -> int:
        if kind == "room":
            self.rooms[name] += 1
            return self.rooms[name]
        if kind == "user":
            self.users[name] += 1
            return self.users[name]
        self.all += 1
        return self.all

    def by_kind(self) -> dict[str, int]:
        return {"room": self.rooms.total(), "user": self.users.total(), "all": self.all}

    def expected(self, members: Counter[str], clients: int) -> dict[str, int]:
        """Deliveries owed per kind: each stream's messages times its members."""
        return {"room": sum(n * members[room] for room, n in self.rooms.items()),
                "user": self.users.total(), "all": self.all * clients}


async def publish_loop(system: HubSystem, pub: Publisher, plan: Plan, t0: float, out: Published) -> None:
    """`plan.rate` messages a second on a fixed schedule, what is due sent every TICK, pipelined."""
    rng = random.Random(plan.seed)
    total = int(plan.rate * plan.seconds)
    sent = 0
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - t0) * plan.rate) + 1)
        if due <= sent:
            await asyncio.sleep(max(0.0, t0 + sent / plan.rate - now))
            continue
        out.lag_max = max(out.lag_max, now - (t0 + (due - 1) / plan.rate))
        m = min(int((now - t0) // plan.interval), plan.intervals - 1)
        items: list[Item] = []
        for kind in rng.choices(KINDS, weights=plan.mix, k=due - sent):
            if kind == "room":
                room = f"r{rng.randrange(plan.rooms)}"
                data = {"s": out.next("room", room), "t": time.monotonic(), "m": m}
                items.append(system.room(room, data, mtype=MTYPE))
            elif kind == "user":
                user = f"s{rng.randrange(plan.clients)}"
                data = {"s": out.next("user", user), "t": time.monotonic(), "m": m}
                items.append(system.user(user, data, mtype=MTYPE))
            else:
                items.append(system.everyone({"s": out.next("all", ""), "t": time.monotonic(), "m": m},
                                             mtype=MTYPE))
        await pub.publish(items)
        sent = due
        await asyncio.sleep(TICK)


# -- the clients --------------------------------------------------------------------------

async def start_clients(urls: list[str], plan: Plan, history: bool, log_dir: Path, tag: str) -> Clients:
    """The soak.js processes (not yet connected), driven like bench/chaos.py's clients."""
    share, extra = divmod(plan.clients, plan.processes)
    procs: list[ClientProc] = []
    start = 0
    try:
        for k in range(plan.processes):
            count = share + (1 if k < extra else 0)
            addresses = ([f"127.0.0.{2 + k * 8 + a}" for a in range(math.ceil(count / SOCKETS_PER_ADDRESS))]
                         if count > SOCKETS_PER_ADDRESS else [])
            cfg = {"urls": urls, "start": start, "count": count, "rooms": plan.rooms,
                   "roomsPerClient": plan.rooms_per_client, "userPrefix": "s", "mtype": MTYPE,
                   "localAddresses": addresses, "concurrency": 64, "timeoutMs": 120_000,
                   "recover": history}
            name = f"{tag}-client{k}"
            procs.append(await ClientProc.spawn(["node", str(SOAK_JS), json.dumps(cfg)], name,
                                                log_dir / f"{name}.log"))
            start += count
    except BaseException:
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
        raise
    return Clients(procs)


async def drain(clients: Clients, total: int, quiet: float, timeout: float) -> dict[str, int]:
    """Wait until every client is joined and nothing arrived for `quiet` seconds (or `timeout`)."""
    return await _drain(clients, quiet, timeout, total=total, interval=0.25)


# -- what /proc and Redis say ---------------------------------------------------------------

async def redis_memory(r: aioredis.Redis) -> dict[str, int]:
    info = await r.info("memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info["used_memory_rss"])}


def node_rss_mb(dep: Deployment) -> list[float | None]:
    out: list[float | None] = []
    for node in dep.nodes:
        try:
            out.append(round(rss_of(node.pid) / 2**20, 1) if node.alive() else None)
        except (OSError, RuntimeError):
            out.append(None)
    return out


def node_cpu(dep: Deployment) -> list[Cpu | None]:
    out: list[Cpu | None] = []
    for node in dep.nodes:
        try:
            out.append(cpu_of(node.pid) if node.alive() else None)
        except OSError:
            out.append(None)
    return out


async def sample(dep: Deployment, r: aioredis.Redis, clients: Clients, t0: float) -> dict[str, Any]:
    """One row of the per-interval table (the latency columns are added from the clients' report)."""
    stats = await clients.stats()
    client_rss = 0
    for p in clients.procs:
        try:
            client_rss += rss_of(p.proc.pid)
        except (OSError, RuntimeError):
            pass
    cpu = node_cpu(dep)
    return {"t_s": round(time.monotonic() - t0, 1), "node_rss_mb": node_rss_mb(dep),
            "node_cpu_s": [round(c.total, 2) if c is not None else None for c in cpu],
            "redis_cpu_s": round(cpu_of(dep.redis.pid).total, 2) if dep.redis else None,
            **await redis_memory(r), "client_rss_mb": round(client_rss / 2**20, 1),
            "clients_joined": stats["open"], "received": stats["received"],
            "reconnects": stats["reconnects"]}


async def sample_loop(dep: Deployment, r: aioredis.Redis, clients: Clients, plan: Plan, t0: float,
                      rows: list[dict[str, Any]]) -> None:
    """A sample at t0 and at the end of every interval, until cancelled."""
    k = 0
    while True:
        delay = t0 + k * plan.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        row = await sample(dep, r, clients, t0)
        rows.append(row)
        rss = " / ".join("-" if x is None else f"{x:.0f}" for x in row["node_rss_mb"])
        log(f"{row['t_s']:6.1f} s: {row['received']:,} received, {row['clients_joined']:,} joined, "
            f"{row['reconnects']:,} reconnects; node RSS {rss} MB; Redis used_memory "
            f"{row['used_memory'] / 2**20:.1f} MB")
        k += 1


def pattern_of(key: str, prefix: str) -> str:
    """`hub:members:{r12}` -> `members:{*}`."""
    return re.sub(r"\{[^}]*\}", "{*}", key.removeprefix(prefix))


async def keys_left(r: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix`, counted by pattern and sorted into membership / registry / history / other."""
    patterns = Counter[str]()
    membership: list[str] = []
    registry: list[str] = []
    async for key in r.scan_iter(match=f"{prefix}*", count=2000):
        pat = pattern_of(key, prefix)
        patterns[pat] += 1
        if pat in MEMBERSHIP and len(membership) < 20:
            membership.append(key)
        elif pat in REGISTRY and len(registry) < 20:
            registry.append(key)
    groups = Counter[str]()
    for pat, n in patterns.items():
        group = ("membership" if pat in MEMBERSHIP else "registry" if pat in REGISTRY
                 else "history" if pat.startswith("stream:") else "other")
        groups[group] += n
    return {"total": patterns.total(), "groups": {g: groups[g] for g in ("membership", "registry", "history",
                                                                        "other")},
            "patterns": dict(sorted(patterns.items())), "membership_keys": membership, "registry_keys": registry}


async def wait_keys_clean(r: aioredis.Redis, prefix: str, timeout: float) -> tuple[dict[str, Any], float | None]:
    """Poll until no membership key is left (or `timeout`): (what is left, seconds it took or None)."""
    t0 = time.monotonic()
    while True:
        left = await keys_left(r, prefix)
        waited = time.monotonic() - t0
        if left["groups"]["membership"] == 0:
            return left, waited
        if waited >= timeout:
            return left, None
        await asyncio.sleep(0.5)


async def node_clients(r: aioredis.Redis, dep: Deployment, prefix: str) -> dict[str, str | None]:
    """The `clients` field of each node's registry hash (docs/redis.md)."""
    out: dict[str, str | None] = {}
    for k in range(len(dep.nodes)):
        node_id = f"node{chr(65 + k)}"
        value = await r.hget(f"{prefix}node:{{{node_id}}}", "clients")
        out[node_id] = None if value is None else str(value)
    return out


# -- one variant ------------------------------------------------------------------------------

def members_per_room(plan: Plan) -> Counter[str]:
    members = Counter[str]()
    for g in range(plan.clients):
        for room in rooms_of(g, plan.rooms, plan.rooms_per_client):
            members[room] += 1
    return members


async def run_variant(plan: Plan, history: bool, log_dir: Path) -> dict[str, Any]:
    system: HubSystem = (HubHistorySystem(ttl=max(300, int(plan.seconds * 3))) if history else HubSystem())
    tag = f"soak-{system.name}"
    log(f"{system.label}: {plan.nodes} nodes, {plan.clients:,} clients in {plan.processes} processes, "
        f"{plan.rooms:,} rooms ({plan.rooms_per_client} each), {plan.rate:g} msg/s "
        f"(room:user:all {':'.join(f'{w:g}' for w in plan.mix)}) for {plan.seconds:g} s")
    dep = await asyncio.to_thread(system.start, plan.nodes, log_dir, tag)
    assert dep.redis is not None
    r = aioredis.from_url(dep.redis.url, decode_responses=True)
    pub = Publisher(dep)
    clients: Clients | None = None
    published = Published()
    events: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    prefix = system.keys.prefix
    try:
        clients = await start_clients(dep.urls, plan, history, log_dir, tag)
        t_connect = time.monotonic()
        ready = await clients.ask("connect", "ready", max(300.0, plan.clients / 20))
        connected = sum(x["connected"] for x in ready)
        connect_s = time.monotonic() - t_connect
        log(f"{connected:,}/{plan.clients:,} clients connected and joined in {connect_s:.1f} s")
        if connected != plan.clients:
            raise RuntimeError(f"only {connected}/{plan.clients} clients ready: "
                               f"{[e for x in ready for e in x['errors']][:5]}")
        memory_before = await redis_memory(r)
        t0 = time.monotonic() + 0.5
        cpu0 = node_cpu(dep)
        sampler = asyncio.create_task(sample_loop(dep, r, clients, plan, t0, rows))
        tasks = [asyncio.create_task(publish_loop(system, pub, plan, t0, published))]
        if history:
            when = argparse.Namespace(kill_at=KILL_AT, blip_at=BLIP_AT, duration=plan.seconds)
            tasks.append(asyncio.create_task(chaos_events(dep, r, when, t0, events)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        log(f"published {published.by_kind()} (publisher at most {published.lag_max * 1000:.0f} ms late); "
            f"draining ...")
        final = await drain(clients, plan.clients, quiet=3.0, timeout=120.0)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        end_row = await sample(dep, r, clients, t0)
        publish_s = time.monotonic() - t0
        cpu1 = node_cpu(dep)
        report = await clients.ask("report", "report", 120)
        metrics = await _node_metrics(dep)
        keys_joined = await keys_left(r, prefix)  # the same census with every client there
        # every client sends its close frame in the same instant, in every process
        t_close = time.monotonic()
        closed = await clients.ask("closeall", "closedall", 90)
        close_s = time.monotonic() - t_close
        log(f"all clients closed in {close_s:.2f} s; watching Redis for membership keys ...")
        left, clean_s = await wait_keys_clean(r, prefix, timeout=30.0 + 5 * 2.0)
        memory_after = await redis_memory(r)
        clients_field = await node_clients(r, dep, prefix)
        alive = [n.alive() for n in dep.nodes]
    finally:
        await r.aclose()
        await pub.close()
        if clients is not None:
            await clients.close()
        await asyncio.to_thread(dep.stop)
    result = tally(plan, history, published, report)
    return {
        "system": system.name, "label": system.label, "history": history, "connect_s": connect_s,
        "publish_s": publish_s, "events": events, **result,
        "publisher_lag_max_ms": published.lag_max * 1000, "final_stats": final,
        "intervals": intervals(rows, end_row, report, plan), "after_drain": end_row,
        "node_cpu_s": [None if a is None or b is None else round((b - a).total, 1)
                       for a, b in zip(cpu0, cpu1, strict=True)],
        "nodes_alive_at_end": alive, "node_metrics": metrics,
        "redis_memory": {"before": memory_before,
                         "peak_used_memory": max(x["used_memory"] for x in [memory_before, *rows, end_row]),
                         "after_close": memory_after},
        "close": {"seconds": close_s, "clean": sum(c["clean"] for c in closed),
                  "forced": sum(c["forced"] for c in closed), "ms_per_process": [c["ms"] for c in closed]},
        "keys_with_clients": {"total": keys_joined["total"], "groups": keys_joined["groups"],
                              "patterns": keys_joined["patterns"]},
        "keys_after_close": {**left, "membership_gone_after_s": clean_s, "node_clients_field": clients_field},
        "logs": str(log_dir),
    }


def tally(plan: Plan, history: bool, published: Published, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Expected / delivered / lost / duplicated per kind, over every client process."""
    expected = published.expected(members_per_room(plan), plan.clients)
    kinds: dict[str, dict[str, Any]] = {}
    sent = published.by_kind()
    for kind in KINDS:
        got = Counter[str]()
        for rep in reports:
            got.update(rep["kinds"][kind])
        kinds[kind] = {"published": sent[kind], "expected": expected[kind], "delivered": got["distinct"],
                       "lost": expected[kind] - got["distinct"], "duplicated": got["duplicates"],
                       "out_of_order": got["outOfOrder"], "holes": got["holes"],
                       "history": history and kind != "all", "recovered": got["recovered"],
                       "not_recovered": got["notRecovered"], "epoch_changes": got["epochChanges"],
                       "without_offset": got["noOffset"] if history and kind != "all" else 0}
    return {
        "kinds": kinds,
        "lost_with_history": sum(k["lost"] for k in kinds.values() if k["history"]),
        "lost_without_history": sum(k["lost"] for k in kinds.values() if not k["history"]),
        "duplicated": sum(k["duplicated"] for k in kinds.values()),
        "foreign": sum(rep["foreign"] for rep in reports),
        "reconnects": sum(rep["reconnects"] for rep in reports),
        "resyncs": sum(rep["resyncs"] for rep in reports),
        "close_codes": dict(sum((Counter(rep["closeCodes"]) for rep in reports), Counter[str]())),
        "client_errors": [e for rep in reports for e in rep["errors"]][:10],
        "examples": [e for rep in reports for e in rep["examples"]][:10],
        "latency_max_ms": max(rep["latMax"] for rep in reports),
    }


def intervals(rows: list[dict[str, Any]], end_row: dict[str, Any], reports: list[dict[str, Any]],
              plan: Plan) -> list[dict[str, Any]]:
    """Per interval: latency of the messages published in it, and the sample taken at its end
    (`rows[k]` was taken at k intervals in; the last interval may end with the one after the drain)."""
    hists: dict[int, Counter[int]] = {}
    for rep in reports:
        for m, hist in rep["hist"].items():
            h = hists.setdefault(int(m), Counter[int]())
            for bucket, n in hist.items():
                h[int(bucket)] += n
    out: list[dict[str, Any]] = []
    for k in range(plan.intervals):
        hist = dict(hists.get(k, {}))
        start = rows[k] if k < len(rows) else {}
        end = rows[k + 1] if k + 1 < len(rows) else end_row
        cpu = [None if a is None or b is None else round(b - a, 2)
               for a, b in zip(start.get("node_cpu_s") or [None] * plan.nodes, end["node_cpu_s"], strict=True)]
        out.append({"interval": k, "from_s": k * plan.interval,
                    "to_s": min((k + 1) * plan.interval, plan.seconds),
                    "deliveries": sum(hist.values()), "p50_ms": percentile_of_hist(hist, 0.5),
                    "p99_ms": percentile_of_hist(hist, 0.99), "max_ms": percentile_of_hist(hist, 1.0),
                    "node_cpu_s": cpu, "sampled_at_s": end["t_s"],
                    **{key: end[key] for key in ("node_rss_mb", "used_memory", "used_memory_rss", "client_rss_mb",
                                                 "clients_joined", "reconnects")}})
    return out


def failures(v: dict[str, Any]) -> list[str]:
    """Why a variant failed (empty: it passed)."""
    out: list[str] = []
    if v["lost_with_history"]:
        out.append(f"{v['lost_with_history']:,} lost on streams with history")
    if not v["history"] and v["lost_without_history"]:
        out.append(f"{v['lost_without_history']:,} lost (no faults in this variant)")
    if v["duplicated"]:
        out.append(f"{v['duplicated']:,} duplicated")
    if v["foreign"]:
        out.append(f"{v['foreign']:,} messages for another client")
    if v["keys_after_close"]["groups"]["membership"]:
        out.append(f"{v['keys_after_close']['groups']['membership']:,} membership keys left after close")
    if v["keys_after_close"]["groups"]["other"]:
        out.append(f"{v['keys_after_close']['groups']['other']:,} unclassified keys left after close")
    return out


# -- the run and its report -------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not hub_cluster_available():
        raise SystemExit("the soak run needs hubnode's cluster mode (hubnode/cluster.py)")
    plan = Plan.from_args(args)
    ensure_node_clients()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = Path(args.out) / "logs" / f"soak-{stamp}"
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.soak_history]
    started = time.monotonic()
    results = []
    for history in variants:
        try:
            v = await run_variant(plan, history, log_dir)
            v["failures"] = failures(v)
        except Exception as exc:  # one failed variant must not lose the other
            log(f"FAILED: {type(exc).__name__}: {exc}")
            v = {"system": "hubnode-history" if history else "hubnode", "history": history,
                 "error": f"{type(exc).__name__}: {exc}", "failures": [f"{type(exc).__name__}: {exc}"]}
        results.append(v)
        log(f"{v['system']}: " + ("OK" if not v["failures"] else "FAILED: " + "; ".join(v["failures"])))
    return {"command": "python -m " + shlex.join(["bench", *sys.argv[1:]]), "started": stamp,
            "elapsed_s": time.monotonic() - started, "plan": asdict(plan), "environment": environment(),
            "variants": results, "ok": all(not v["failures"] for v in results)}


def _n(x: Any) -> str:
    return "-" if x is None else f"{x:,}"


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.1f}"


def summary(report: dict[str, Any]) -> str:
    """The printed summary: one block per variant."""
    lines: list[str] = []
    for v in report["variants"]:
        lines.append(f"== {v['system']}: {'OK' if not v['failures'] else 'FAILED: ' + '; '.join(v['failures'])}")
        if "error" in v:
            continue
        for kind, k in v["kinds"].items():
            lines.append(f"  {kind:<4} published {k['published']:>9,}  expected {k['expected']:>12,}  "
                         f"delivered {k['delivered']:>12,}  lost {k['lost']:>8,}  duplicated {k['duplicated']:,}"
                         + ("  (no history)" if v["history"] and not k["history"] else ""))
        for e in v["events"]:
            lines.append(f"  {e['event']} {e.get('node', '')} at {e['at_s']:.1f} s")
        lines.append(f"  reconnects {v['reconnects']:,}, resyncs {v['resyncs']:,}, "
                     f"latency max {v['latency_max_ms']:,.0f} ms")
        keys = v["keys_after_close"]
        lines.append(f"  after close: membership keys {keys['groups']['membership']:,}"
                     f" (gone after {_ms(keys['membership_gone_after_s'])} s), registry "
                     f"{keys['groups']['registry']:,}, history {keys['groups']['history']:,}, "
                     f"other {keys['groups']['other']:,}; Redis used_memory "
                     f"{v['redis_memory']['after_close']['used_memory'] / 2**20:.1f} MB")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    env = report["environment"]
    mix = ":".join(f"{w:g}" for w in plan["mix"])
    out = [
        "# Soak run", "",
        f"`{report['command']}`, {report['started']}, {report['elapsed_s'] / 60:.1f} min in all. "
        f"{env['machine']['cpus']} cores, {env['machine']['memory_gib']} GiB, hubnode "
        f"{env['git']['revision']}{' (dirty)' if env['git']['hubnode_dirty'] else ''}.", "",
        f"{plan['nodes']} nodes on one Redis; {plan['clients']:,} clients (Node.js, bench/client/soak.js, "
        f"{plan['processes']} processes), each a user and in {plan['rooms_per_client']} of {plan['rooms']:,} "
        f"rooms; {plan['rate']:g} msg/s published through Redis, room:user:all = {mix}, for "
        f"{plan['seconds'] / 60:g} min; then every client closed at once.", "",
    ]
    for v in report["variants"]:
        out += [f"## {v['system']}" + (" (history on; a node SIGKILLed, a subscriber killed)" if v["history"]
                                        else " (history off, no faults)"), ""]
        out += ["**" + ("OK" if not v["failures"] else "FAILED: " + "; ".join(v["failures"])) + "**", ""]
        if "error" in v:
            continue
        out += ["| kind | history | published | expected | delivered | lost | duplicated | out of order |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for kind, k in v["kinds"].items():
            out.append(f"| {kind} | {'yes' if k['history'] else 'no'} | {k['published']:,} | {k['expected']:,} | "
                       f"{k['delivered']:,} | {k['lost']:,} | {k['duplicated']:,} | {k['out_of_order']:,} |")
        out.append("")
        if v["events"]:
            out += ["Events: " + "; ".join(f"{e['event']} {e.get('node', '')} at {e['at_s']:.1f} s"
                                            for e in v["events"]) + ".", ""]
        if v["history"]:
            rec = {k: (x["recovered"], x["not_recovered"]) for k, x in v["kinds"].items() if x["history"]}
            out += [f"Reconnects {v['reconnects']:,}; recoveries recovered / refused: "
                    + ", ".join(f"{k} {a:,} / {b:,}" for k, (a, b) in rec.items())
                    + f"; resyncs {v['resyncs']:,}; messages without offset "
                    f"{sum(x['without_offset'] for x in v['kinds'].values()):,}. Messages to `all` have no "
                    "history: those sent while a client was reconnecting are lost by design.", ""]
        out += ["Latency: publish to delivery, of the messages published in the interval. The other columns: "
                "sampled at the interval's end (node CPU: seconds used in the interval, per node).", "",
                "| interval | p50 ms | p99 ms | max ms | deliveries | node RSS MB | node CPU s | "
                "Redis used_memory MB | clients joined |", "|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for row in v["intervals"]:
            rss = " / ".join("-" if x is None else f"{x:.0f}" for x in row["node_rss_mb"] or [])
            cpu = " / ".join("-" if x is None else f"{x:.1f}" for x in row["node_cpu_s"] or [])
            mem = "-" if row["used_memory"] is None else f"{row['used_memory'] / 2**20:.1f}"
            out.append(f"| {row['from_s']:g}-{row['to_s']:g} s | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | "
                       f"{_ms(row['max_ms'])} | {row['deliveries']:,} | {rss} | {cpu} | {mem} | "
                       f"{_n(row['clients_joined'])} |")
        mem = v["redis_memory"]
        keys = v["keys_after_close"]
        close = v["close"]
        gone = keys["membership_gone_after_s"]
        out += ["", f"Redis used_memory: {mem['before']['used_memory'] / 2**20:.1f} MB with every client joined, "
                f"peak {mem['peak_used_memory'] / 2**20:.1f} MB, {mem['after_close']['used_memory'] / 2**20:.1f} MB "
                "after all closed.", "",
                f"Close: {close['clean']:,} clients closed cleanly ({close['forced']:,} forced) in "
                f"{close['seconds']:.2f} s. Membership keys "
                + (f"all gone {gone:.1f} s later." if gone is not None
                   else f"still there after the deadline: {keys['membership_keys']}.")
                + f" Nodes' `clients` fields: {keys['node_clients_field']}.", "",
                "Keys by pattern, with every client joined and after all closed:", "",
                "| pattern | kind | with clients | after close |", "|---|---|---:|---:|"]
        before = v["keys_with_clients"]["patterns"]
        for pat in sorted(set(before) | set(keys["patterns"])):
            kind = ("membership" if pat in MEMBERSHIP else "registry" if pat in REGISTRY
                    else "history (expires with --history-ttl)" if pat.startswith("stream:") else "other")
            out.append(f"| `{pat}` | {kind} | {before.get(pat, 0):,} | {keys['patterns'].get(pat, 0):,} |")
        out.append("")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    """Run the soak (variants per `args.soak_history`), write SOAK.md and the JSON, print the summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=1, default=str)
    path = out / f"soak-{report['started']}.json"
    path.write_text(text)
    (out / "soak-latest.json").write_text(text)
    (out / "SOAK.md").write_text(markdown(report))
    print(summary(report))
    log(f"wrote {out / 'SOAK.md'}, {path}")
    return 0 if report["ok"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args(None)))
