"""`python -m bench.presence`: what one presence event costs, in a room of thousands.

docs/protocol.md: a node run with `--presence-rooms` announces
`{"type":"presence","room":R,"data":{"event":"join"|"leave","user_id":U}}`
to every member of R when user U's first connection joins R and when U's
last one leaves. On Redis the member scripts (member_add.lua,
member_remove.lua) count the room's users and PUBLISH the event from inside
the script; each node then fans it out to its members of R like any room
message. This measures both halves, on this machine, over loopback:

- a private redis-server (bench.procs.RedisServer) and 2 hubnode processes
  on it (bench.systems.HubSystem's flags, `--redis-url`), started twice:
  once *without* `--presence-rooms` and once *with* it covering the room;
- the room: `--members` connections (5,000) held by the bench's load client
  (bench/client/load.js under Node.js, `--client python` for
  bench/pyclient.py), spread evenly over the 2 nodes (client i on node i % 2)
  in `--client-processes` processes. They are ANONYMOUS: they receive events
  and make none. (The load clients always append `?user_id=<prefix><i>` to
  the URL; the URL given them ends in `?anonymous=`, so that becomes the
  value of an unused parameter and the node sees no user_id.) Plus
  `--observers` anonymous connections per node, held by this process, that
  log every presence event they get;
- the churn: `--users` (K) distinct users, `--concurrency` at a time, each
  connecting (alternately to each node), joining the room (ack awaited),
  leaving it (ack awaited; `--end disconnect`: closing instead) and closing:
  2K presence events with `--presence-rooms`, each delivered to every member.

A round's window opens just before the first churn user connects and closes
when every member (load clients and observers) has received a marker message
published on the room's channel after the churn (and after the room's
members hash in Redis is back to its size before it): that marker follows
every event on each node's subscription, so when all have it, every event has
been delivered. Over the window: CPU-seconds of both node processes
(utime + stime, /proc/<pid>/stat), Redis CPU (INFO cpu used_cpu_user +
used_cpu_sys; /proc beside it), INFO commandstats (EVALSHA and PUBLISH calls
and their usec), the nodes' own `delivered` counters (GET /api/metrics).
Just before each window an idle window of `--idle` seconds measures what the
nodes and Redis use doing nothing (heartbeats every 2 s, metrics snapshots);
the "net" figures subtract that rate times the window's length.

Per event (round by round, without and with paired):
- node CPU ms per event = (node CPU with - without) / events;
- Redis CPU us per event = (Redis CPU net with - net without) / events;
- deliveries/s = the extra deliveries (with - without) over the with window;
and, for comparison, the membership steps themselves (without events): Redis
CPU and EVALSHA calls per churn user.

Then "Redis alone": the same churn steps (connect, join, leave, disconnect)
sent by two RedisMembershipStores, one announcing and one not, on a fresh
redis-server with the room holding `--members` members and two pub/sub
subscribers standing for the nodes, blocks of `--alone-users` users
alternating between the two: Redis CPU and script time per event with
nothing else on that Redis and no fan-out competing for the cores. The
end-to-end Redis figure above also carries what the longer with-window costs
Redis besides the events (its commands spread thinly over a busy machine);
this one does not.

Checked every round (a FAIL line and exit status 1 otherwise): every
observer got exactly a join then a leave for each churn user and nothing
else (none at all without presence); every load client got the marker once
and none was closed; Redis ran one PUBLISH per event plus the marker
(besides the nodes' liveness probes, at their idle rate); the
nodes' delivered counters are at least events x (members + observers) +
the marker's, and above that by no more than the churn users themselves
could have received (events x concurrency).

    .venv/bin/python -m bench.presence --quick     # 1,000 members, 50 users: under a minute
    .venv/bin/python -m bench.presence             # 5,000 members, 200 users, 2 rounds: 2-3 minutes
    .venv/bin/python -m bench.presence --users 100 --concurrency 1 --end disconnect

Writes bench/out/presence-<time>.json (and presence-latest.json) and prints
the table. On a 2-core machine the nodes, Redis and the load clients share
both cores: the "cores busy" line says who used them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.__main__ import log, wait_quiet
from bench.loadgen import Fleet, ensure_node_clients
from bench.procs import ROOT, Cpu, RedisServer, cpu_of, machine_busy
from bench.publish import Publisher
from bench.report import environment
from bench.scenarios import CONNECTS_IN_FLIGHT, warm_up
from bench.systems import Deployment, HubSystem, hub_cluster_available
from hubnode.membership.redis import RedisMembershipStore
from publisher.keys import Keys

__all__ = ["FULL", "QUICK", "Sizes", "main", "parse_args", "run", "table"]

NODES = 2
ROOM = "presence-bench"
STEP_TIMEOUT = 60.0  # one churn step (connect, join, leave) or one wait for a marker
MODES = ("without", "with")


@dataclass(frozen=True)
class Sizes:
    members: int  # anonymous load clients in the room
    users: int  # K churn users per round: 2K events with presence
    rounds: int  # churn rounds per deployment (fresh users each)
    concurrency: int  # churn users in flight at once
    observers: int  # observing connections per node, held by this process
    idle: float  # seconds of the idle window before each round
    alone_users: int  # Redis alone: churn users per block
    alone_blocks: int  # Redis alone: blocks per mode, the modes alternating


QUICK = Sizes(members=1000, users=50, rounds=1, concurrency=4, observers=2, idle=1.0, alone_users=500, alone_blocks=2)
FULL = Sizes(members=5000, users=200, rounds=2, concurrency=4, observers=2, idle=2.0, alone_users=2000,
             alone_blocks=3)


class PresenceHub(HubSystem):
    """hubnode as the bench runs it, with `--presence-rooms ROOM` or without."""

    def __init__(self, presence: bool) -> None:
        super().__init__()
        self.presence = presence
        self.name = f"hubnode-presence-{'on' if presence else 'off'}"

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        extra = ["--presence-rooms", ROOM] if self.presence else []
        return [*super().argv(port, redis_url, index), *extra]


# -- observers and churn users (this process, aiohttp) ----------------------------------------

class Observer:
    """An anonymous member of the room that logs the presence events and markers it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, node: int) -> None:
        self.ws, self.node = ws, node
        self.events: list[tuple[str, str]] = []
        self.markers: list[Any] = []
        self.other = 0
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str, node: int) -> Observer:
        ws = await session.ws_connect(url, autoping=True, max_msg_size=0)
        await _until(ws, lambda f: f.get("type") == "connected")
        await ws.send_str(json.dumps({"type": "join_room", "data": ROOM, "id": 1}))
        await _until(ws, lambda f: f.get("id") == 1, ack=True)
        return cls(ws, node)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = orjson.loads(msg.data)
            kind = frame.get("type")
            if kind == "presence" and frame.get("room") == ROOM:
                data = frame.get("data") or {}
                self.events.append((str(data.get("event")), str(data.get("user_id"))))
            elif kind == "bench":
                self.markers.append((frame.get("data") or {}).get("marker"))
            elif kind != "warmup":
                self.other += 1

    def reset(self) -> None:
        self.events, self.markers = [], []

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _until(ws: aiohttp.ClientWebSocketResponse, match: Any, ack: bool = False) -> dict[str, Any]:
    """The first frame `match` accepts (others, events included, are skipped); an error frame for it raises."""
    async with asyncio.timeout(STEP_TIMEOUT):
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"socket ended ({msg.type.name}, {msg.data!r}) before the expected frame")
            frame: dict[str, Any] = orjson.loads(msg.data)
            if match(frame):
                if ack and frame.get("type") != "ack":
                    raise RuntimeError(f"expected an ack, got {frame}")
                return frame


async def churn_user(session: aiohttp.ClientSession, url: str, user: str, end: str) -> None:
    """Connect as `user`, join the room, leave it (or not: `end` "disconnect"), close."""
    ws = await session.ws_connect(f"{url}?user_id={user}", autoping=True, max_msg_size=0)
    try:
        await _until(ws, lambda f: f.get("type") == "connected")
        await ws.send_str(json.dumps({"type": "join_room", "data": ROOM, "id": 1}))
        await _until(ws, lambda f: f.get("id") == 1, ack=True)
        if end == "leave":
            await ws.send_str(json.dumps({"type": "leave_room", "data": ROOM, "id": 2}))
            await _until(ws, lambda f: f.get("id") == 2, ack=True)
    finally:
        await ws.close()


async def churn(session: aiohttp.ClientSession, urls: list[str], users: list[str], concurrency: int,
                end: str) -> None:
    pending = iter(enumerate(users))

    async def worker() -> None:
        for k, user in pending:
            await churn_user(session, urls[k % len(urls)], user, end)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(users))))))


# -- readings -------------------------------------------------------------------------------------

@dataclass
class Reading:
    """Everything the window compares, read at one moment."""

    t: float
    nodes: list[Cpu]
    redis_info_s: float
    redis_proc_s: float
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    clients: Cpu
    own: Cpu
    machine: float


async def read(dep: Deployment, admin: aioredis.Redis, fleet: Fleet) -> Reading:
    assert dep.redis is not None
    cpu, stats = await admin.info("cpu"), await admin.info("commandstats")
    commands = {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}
    return Reading(t=time.monotonic(), nodes=[cpu_of(pid) for pid in dep.node_pids],
                   redis_info_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                   redis_proc_s=cpu_of(dep.redis.pid).total, commands=commands, clients=fleet.cpu(),
                   own=cpu_of(os.getpid()), machine=machine_busy())


def window(a: Reading, b: Reading) -> dict[str, Any]:
    """What happened between two readings."""
    nodes = [(y - x).total for x, y in zip(a.nodes, b.nodes, strict=True)]
    seconds = b.t - a.t

    def cmd(name: str) -> tuple[int, int]:
        c0, u0 = a.commands.get(name, (0, 0))
        c1, u1 = b.commands.get(name, (0, 0))
        return c1 - c0, u1 - u0

    evalsha, publish = cmd("evalsha"), cmd("publish")
    total_calls = sum(c for c, _ in b.commands.values()) - sum(c for c, _ in a.commands.values())
    total_usec = sum(u for _, u in b.commands.values()) - sum(u for _, u in a.commands.values())
    node_cpu, redis_cpu = sum(nodes), b.redis_info_s - a.redis_info_s
    clients, own = (b.clients - a.clients).total, (b.own - a.own).total
    machine = b.machine - a.machine
    return {"seconds": seconds, "node_cpu_s": node_cpu, "node_cpu_s_each": nodes,
            "redis_cpu_s": redis_cpu, "redis_proc_cpu_s": b.redis_proc_s - a.redis_proc_s,
            "evalsha_calls": evalsha[0], "evalsha_usec": evalsha[1],
            "publish_calls": publish[0], "publish_usec": publish[1],
            "redis_calls": total_calls, "redis_cmd_usec": total_usec,
            "client_cpu_s": clients, "controller_cpu_s": own,
            "cores": {"nodes": node_cpu / seconds, "redis": redis_cpu / seconds, "clients": clients / seconds,
                      "controller": own / seconds,
                      "others": max(0.0, machine - node_cpu - redis_cpu - clients - own) / seconds}}


async def delivered(session: aiohttp.ClientSession, dep: Deployment) -> list[int]:
    """Each node's `delivered` counter (frames written to client sockets by fan-out)."""
    out = []
    for base in dep.http:
        async with session.get(f"{base}/api/metrics") as resp:
            resp.raise_for_status()
            out.append(int((await resp.json())["delivered"]))
    return out


# -- one deployment ----------------------------------------------------------------------------------

async def members_now(admin: aioredis.Redis, system: HubSystem) -> int:
    return int(await admin.hlen(system.keys.members(ROOM)))


async def wait_members(admin: aioredis.Redis, system: HubSystem, want: int) -> None:
    end = time.monotonic() + STEP_TIMEOUT
    while (have := await members_now(admin, system)) != want:
        if time.monotonic() > end:
            raise TimeoutError(f"{system.keys.members(ROOM)} holds {have} members, expected {want}")
        await asyncio.sleep(0.02)


async def wait_marker(fleet: Fleet, observers: list[Observer], members: int, marker: int) -> None:
    """Until every load client and every observer got the marker (load clients count 'bench' frames)."""
    end = time.monotonic() + STEP_TIMEOUT
    while True:
        stats = await fleet.stats()
        if stats.received >= members and all(marker in o.markers for o in observers):
            return
        if time.monotonic() > end:
            got = sum(marker in o.markers for o in observers)
            raise TimeoutError(f"marker {marker}: {stats.received}/{members} load clients and "
                               f"{got}/{len(observers)} observers got it")
        await asyncio.sleep(0.05)


async def one_round(dep: Deployment, admin: aioredis.Redis, fleet: Fleet, pub: Publisher,
                    session: aiohttp.ClientSession, observers: list[Observer], sizes: Sizes,
                    args: argparse.Namespace, mode: str, index: int) -> dict[str, Any]:
    system = dep.system
    assert isinstance(system, PresenceHub)
    base_members = sizes.members + len(observers)
    users = [f"churn-{mode}-{index}-{k}" for k in range(sizes.users)]
    load = await asyncio.to_thread(wait_quiet, args.quiet_below, args.quiet_wait) if args.quiet_wait else None

    idle0 = await read(dep, admin, fleet)
    await asyncio.sleep(sizes.idle)
    idle = window(idle0, await read(dep, admin, fleet))

    await fleet.reset()
    for o in observers:
        o.reset()
    counted0 = await delivered(session, dep)
    marker = index + 1
    a = await read(dep, admin, fleet)
    await churn(session, dep.urls, users, sizes.concurrency, args.end)
    churned = time.monotonic()
    await wait_members(admin, system, base_members)  # every leave is in Redis (its event published)
    await pub.publish([system.room(ROOM, {"marker": marker}, mtype="bench")])
    await wait_marker(fleet, observers, sizes.members, marker)
    b = await read(dep, admin, fleet)
    counted1 = await delivered(session, dep)
    stats = await fleet.stats()
    dep.check()

    row: dict[str, Any] = {"mode": mode, "round": index + 1, "users": sizes.users,
                           "background_before_cores": load, "churn_s": churned - a.t,
                           **window(a, b), "idle": idle}
    # the idle rate over the window's length: heartbeats, metrics snapshots
    scale = row["seconds"] / max(1e-9, idle["seconds"])
    row["node_cpu_net_s"] = row["node_cpu_s"] - idle["node_cpu_s"] * scale
    row["redis_cpu_net_s"] = row["redis_cpu_s"] - idle["redis_cpu_s"] * scale
    row["evalsha_calls_net"] = row["evalsha_calls"] - idle["evalsha_calls"] * scale
    row["delivered"] = sum(counted1) - sum(counted0)
    row["delivered_each"] = [y - x for x, y in zip(counted0, counted1, strict=True)]

    # -- checks ----------------------------------------------------------------------------------
    problems: list[str] = []
    events = 2 * sizes.users if system.presence else 0
    want = sorted([("join", u) for u in users] + [("leave", u) for u in users]) if system.presence else []
    seen = []
    for o in observers:
        seen.append(len(o.events))
        if sorted(o.events) != want:
            problems.append(f"observer on node {o.node} got {len(o.events)} events, expected {len(want)} "
                            f"(first extra/missing: {sorted(set(o.events) ^ set(want))[:3]})")
        elif want and any(o.events.index(("join", u)) > o.events.index(("leave", u)) for u in users):
            problems.append(f"observer on node {o.node} got a leave before its join")
        if o.markers != [marker]:
            problems.append(f"observer on node {o.node} got markers {o.markers}, expected [{marker}]")
    if stats.received != sizes.members or stats.min_per_client != 1 or stats.max_per_client != 1:
        problems.append(f"load clients got {stats.received} markers (per client {stats.min_per_client}.."
                        f"{stats.max_per_client}), expected 1 each of {sizes.members}")
    if stats.closed:
        problems.append(f"{stats.closed} load clients were closed ({stats.close_codes})")
    # the nodes' liveness probes PUBLISH on their own channels too (every 2 s): allowed at the idle rate
    others = row["publish_calls"] - events - 1
    probes = idle["publish_calls"] * scale + 2 * NODES
    if not 0 <= others <= probes:
        problems.append(f"Redis ran {row['publish_calls']} PUBLISH, expected {events} events + 1 marker "
                        f"+ at most {probes:.0f} probes of the nodes")
    floor = (events + 1) * base_members
    if not floor <= row["delivered"] <= floor + events * sizes.concurrency:
        problems.append(f"nodes delivered {row['delivered']} frames, expected {floor} "
                        f"(+ at most {events * sizes.concurrency} to the churn users)")
    row.update(events=events, observed_events_each=seen, other_publishes=others, marker_received=stats.received,
               expected_deliveries_min=floor, problems=problems)
    return row


async def run_mode(mode: str, sizes: Sizes, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start Redis and 2 nodes (with or without presence), fill the room, run the rounds, stop it all."""
    system = PresenceHub(presence=mode == "with")
    log(f"{mode} presence: starting redis-server and {NODES} nodes ...")
    dep = await asyncio.to_thread(system.start, NODES, log_dir, system.name)
    out: dict[str, Any] = {"mode": mode, "argv": system.argv(0, "<redis-url>", 0)[1:], "rounds": []}
    fleet: Fleet | None = None
    pub: Publisher | None = None
    observers: list[Observer] = []
    try:
        assert dep.redis is not None
        admin = aioredis.Redis.from_url(dep.redis.url, decode_responses=True)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # observers + churners
        try:
            # the load clients append ?user_id=...: after '?anonymous=' it is that parameter's value
            anonymous = [f"{u}?anonymous=" for u in dep.urls]
            t0 = time.monotonic()
            fleet = await Fleet.start(kind=args.client, proto="hub", urls=anonymous, total=sizes.members,
                                      processes=args.client_processes, log_dir=log_dir,
                                      tag=f"{system.name}-members", rooms={"shared": [ROOM]},
                                      concurrency=CONNECTS_IN_FLIGHT, timeout=args.timeout)
            ready = await fleet.connect(args.timeout)
            if ready.connected != sizes.members:
                raise RuntimeError(f"only {ready.connected}/{sizes.members} members connected: {ready.errors[:5]}")
            for node, url in enumerate(dep.urls):
                for _ in range(sizes.observers):
                    observers.append(await Observer.open(session, url, node))
            pub = Publisher(dep)
            await warm_up(fleet, pub, system)
            await wait_members(admin, system, sizes.members + len(observers))
            out["setup"] = {"members": sizes.members, "observers": len(observers), "connect_s": ready.seconds,
                            "setup_s": time.monotonic() - t0,
                            "members_per_node": [len(range(k, sizes.members, NODES)) for k in range(NODES)],
                            "presence_hash_users": int(await admin.hlen(system.keys.presence(ROOM)))}
            log(f"  {sizes.members:,} anonymous members + {len(observers)} observers in {ROOM!r} "
                f"({ready.seconds:.1f} s to connect)")
            for index in range(sizes.rounds):
                row = await one_round(dep, admin, fleet, pub, session, observers, sizes, args, mode, index)
                out["rounds"].append(row)
                log(f"  round {index + 1}: {headline(row)}")
        finally:
            for o in observers:
                await o.close()
            await session.close()
            await admin.aclose()
    finally:
        if pub is not None and pub.redis is not None:
            with contextlib.suppress(Exception):
                await pub.redis.aclose()
        if fleet is not None:
            await fleet.close()
        await asyncio.to_thread(dep.stop)
    return out


def headline(row: dict[str, Any]) -> str:
    state = "ok" if not row["problems"] else f"FAILED ({len(row['problems'])})"
    return (f"{row['events']} events, {row['delivered']:,} delivered in {row['seconds']:.1f} s; nodes "
            f"{row['node_cpu_s']:.2f} CPU-s, Redis {row['redis_cpu_s'] * 1e3:.1f} CPU-ms "
            f"({row['evalsha_calls']} EVALSHA, {row['publish_calls']} PUBLISH); {state}")


# -- Redis alone: the member scripts driven by the store itself ---------------------------------------

async def redis_alone(sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    """The same churn steps sent by two RedisMembershipStores (one announcing, one not) on a fresh Redis.

    No node and no WebSocket: the stores (hubnode.membership.redis, public API
    as bench.membership_scale uses it) send exactly what a node's store sends
    for a connect, a join, a leave and a disconnect, one churn user at a time,
    into the room already holding `members` anonymous members (registered by
    the first store's start()). Two pub/sub connections stand for the two
    nodes' subscribers and read every event. Blocks of `alone_users` users
    alternate between the two stores, `alone_blocks` each; Redis CPU (INFO cpu)
    and commandstats over each block. Nothing else runs against this Redis,
    so the difference is the events' own cost to Redis.
    """
    server = RedisServer(log_dir, "alone-redis")
    keys = Keys("hub:")
    admin = aioredis.Redis.from_url(server.url, decode_responses=True)
    clients = [aioredis.Redis.from_url(server.url) for _ in range(2)]
    stores = {mode: RedisMembershipStore(client, keys, f"alone-{mode}", heartbeat=3600.0,
                                         announces=_always if mode == "with" else _never)
              for mode, client in zip(MODES, clients, strict=True)}
    subscribers = [aioredis.Redis.from_url(server.url) for _ in range(NODES)]
    got = [0] * NODES
    readers: list[asyncio.Task[None]] = []

    async def drain(k: int, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                got[k] += 1

    try:
        bulk = [(f"alone-without:b{i}", None, frozenset({ROOM})) for i in range(sizes.members)]
        await stores["without"].start(lambda: bulk)
        await stores["with"].start(lambda: ())
        for k, sub in enumerate(subscribers):
            pubsub = sub.pubsub()
            await pubsub.subscribe(keys.room_channel(ROOM))
            readers.append(asyncio.create_task(drain(k, pubsub)))

        async def block(mode: str, first: int, count: int) -> None:
            store = stores[mode]
            for i in range(first, first + count):
                conn, user = f"alone-{mode}:c{i}", f"alone-{mode}-{i}"
                await store.add_connection(conn, user)
                await store.add_member(ROOM, conn, user)
                await store.remove_member(ROOM, conn, user)
                await store.remove_connection(conn, user, ())

        for mode in MODES:  # warm: every script loaded, the connections' buffers grown
            await block(mode, 10**6, 20)
        blocks: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        n = sizes.alone_users
        for b in range(sizes.alone_blocks):
            for mode in MODES:
                before = await _redis_reading(admin)
                t0 = time.monotonic()
                await block(mode, b * n, n)
                seconds = time.monotonic() - t0
                after = await _redis_reading(admin)
                blocks[mode].append({"seconds": seconds, **{k: after[k] - before[k] for k in before}})
        events = 2 * n * sizes.alone_blocks + 2 * 20  # the warm-up's too
        end = time.monotonic() + STEP_TIMEOUT
        while sum(got) < NODES * events and time.monotonic() < end:
            await asyncio.sleep(0.02)
        members = int(await admin.hlen(keys.members(ROOM)))
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await admin.flushall()
        for store in stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        for c in [admin, *subscribers]:
            with contextlib.suppress(Exception):
                await c.aclose()
        server.stop()

    def per(mode: str, key: str, b: int, div: float) -> float:
        return float(blocks[mode][b][key]) / div

    count = range(sizes.alone_blocks)
    cpu_event = sorted((per("with", "cpu_s", b, 1) - per("without", "cpu_s", b, 1)) / (2 * n) * 1e6 for b in count)
    script_event = sorted((per("with", "evalsha_usec", b, 1) - per("without", "evalsha_usec", b, 1)) / (2 * n)
                          for b in count)
    problems = []
    if got != [events] * NODES:
        problems.append(f"the {NODES} subscribers got {got} events, expected {events} each")
    if members != sizes.members:
        problems.append(f"the room holds {members} members after the churn, expected {sizes.members}")
    for b in count:
        if blocks["with"][b]["publish_calls"] != 2 * n or blocks["without"][b]["publish_calls"]:
            problems.append(f"block {b + 1}: {blocks['with'][b]['publish_calls']} PUBLISH with presence "
                            f"(expected {2 * n}), {blocks['without'][b]['publish_calls']} without (expected 0)")
    return {
        "members": sizes.members, "users_per_block": n, "blocks": blocks, "subscribers_got": got,
        "redis_cpu_us_per_event": cpu_event[len(cpu_event) // 2], "redis_cpu_us_per_event_each": cpu_event,
        "script_usec_per_event": script_event[len(script_event) // 2],
        "membership_redis_cpu_us_per_user": statistics.median(
            per("without", "cpu_s", b, n) * 1e6 for b in count),
        "membership_evalsha_per_user": statistics.median(per("without", "evalsha_calls", b, n) for b in count),
        "membership_commands_per_user": statistics.median(per("without", "calls", b, n) for b in count),
        "membership_script_usec_per_user": statistics.median(per("without", "evalsha_usec", b, n) for b in count),
        "wall_us_per_user": {m: statistics.median(per(m, "seconds", b, n) * 1e6 for b in count) for m in MODES},
        "problems": problems,
    }


def _always(_room: str) -> bool:
    return True


def _never(_room: str) -> bool:
    return False


async def _redis_reading(admin: aioredis.Redis) -> dict[str, float]:
    cpu, stats = await admin.info("cpu"), await admin.info("commandstats")
    ev, pub = stats.get("cmdstat_evalsha", {}), stats.get("cmdstat_publish", {})
    return {"cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "calls": sum(int(v["calls"]) for v in stats.values()),
            "evalsha_calls": int(ev.get("calls", 0)), "evalsha_usec": int(ev.get("usec", 0)),
            "publish_calls": int(pub.get("calls", 0))}


# -- the run and its report --------------------------------------------------------------------------

def derive(results: dict[str, dict[str, Any]], sizes: Sizes) -> list[dict[str, Any]]:
    """Per round: the cost of one event (with minus without) and of the membership steps alone."""
    out = []
    off, on = results.get("without", {}).get("rounds", []), results.get("with", {}).get("rounds", [])
    for w0, w1 in zip(off, on, strict=False):
        events = w1["events"] or 1
        extra = w1["delivered"] - w0["delivered"]
        node = w1["node_cpu_s"] - w0["node_cpu_s"]
        out.append({
            "round": w1["round"], "events": w1["events"], "presence_deliveries": extra,
            "node_cpu_ms_per_event": node / events * 1e3,
            "node_cpu_ms_per_event_net": (w1["node_cpu_net_s"] - w0["node_cpu_net_s"]) / events * 1e3,
            "node_cpu_us_per_delivery": node / max(1, extra) * 1e6,
            "redis_cpu_us_per_event": (w1["redis_cpu_net_s"] - w0["redis_cpu_net_s"]) / events * 1e6,
            "redis_cpu_us_per_event_raw": (w1["redis_cpu_s"] - w0["redis_cpu_s"]) / events * 1e6,
            "redis_evalsha_usec_per_event": (w1["evalsha_usec"] - w0["evalsha_usec"]) / events,
            "deliveries_per_s": extra / w1["seconds"],
            "client_cpu_ms_per_event": (w1["client_cpu_s"] - w0["client_cpu_s"]) / events * 1e3,
            "membership_redis_cpu_us_per_user": w0["redis_cpu_net_s"] / sizes.users * 1e6,
            "membership_evalsha_per_user": w0["evalsha_calls_net"] / sizes.users,
            "membership_evalsha_usec_per_call": w0["evalsha_usec"] / max(1, w0["evalsha_calls"]),
            "presence_evalsha_usec_per_call": w1["evalsha_usec"] / max(1, w1["evalsha_calls"]),
            "membership_node_cpu_ms_per_user": w0["node_cpu_net_s"] / sizes.users * 1e3,
        })
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not hub_cluster_available():
        raise SystemExit("hubnode has no cluster mode here (hubnode.cluster): nothing to measure")
    sizes = sizes_of(args)
    if args.client == "node":
        ensure_node_clients()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = args.out / "logs" / f"presence-{stamp}"
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        try:
            results[mode] = await run_mode(mode, sizes, args, log_dir)
        except Exception as exc:  # the other mode's figures are still worth writing
            results[mode] = {"mode": mode, "error": f"{type(exc).__name__}: {exc}", "rounds": [],
                             "traceback": traceback.format_exc()}
            log(f"{mode} presence FAILED: {results[mode]['error']}\n{results[mode]['traceback']}")
    alone: dict[str, Any] = {}
    if not args.no_alone:
        log(f"Redis alone: {sizes.alone_blocks} x {sizes.alone_users} churn users per mode, "
            f"{sizes.members:,} members ...")
        try:
            alone = await redis_alone(sizes, log_dir)
            log(f"  Redis CPU {alone['redis_cpu_us_per_event']:.1f} us per event; membership alone "
                f"{alone['membership_redis_cpu_us_per_user']:.1f} us per churn user")
        except Exception as exc:
            alone = {"error": f"{type(exc).__name__}: {exc}", "problems": []}
            log(f"Redis alone FAILED: {alone['error']}")
    return {"command": "python -m bench.presence " + shlex.join(args.argv), "started": stamp,
            "mode": "quick" if args.quick else "full", "elapsed_s": time.monotonic() - started,
            "sizes": asdict(sizes), "end": args.end, "client": args.client, "nodes": NODES, "room": ROOM,
            "log_dir": str(log_dir), "environment": environment(), "results": results,
            "per_event": derive(results, sizes), "redis_alone": alone}


Line = tuple[str, Callable[[dict[str, Any]], str]]


def _f(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def table(report: dict[str, Any]) -> str:
    s, results = report["sizes"], report["results"]
    rows = [(mode, r) for mode in MODES if mode in results for r in results[mode]["rounds"]]
    lines = [f"# presence events: {s['members']:,} members over {report['nodes']} nodes "
             f"({report['mode']} run)", "",
             f"`{report['command']}`, {report['started']}, {report['elapsed_s']:.0f} s; load client "
             f"{'load.js' if report['client'] == 'node' else 'pyclient.py'}; {s['users']} churn users per round, "
             f"{s['concurrency']} at a time, ending by {report['end']}; {s['observers']} observers per node; "
             f"hubnode at `{report['environment']['git']['revision']}`.", ""]
    for mode in MODES:
        if "error" in results.get(mode, {}):
            lines.append(f"- FAILED {mode}: {results[mode]['error']}")
    if rows:
        head = "| | " + " | ".join(f"{m} presence, round {r['round']}" for m, r in rows) + " |"
        lines += [head, "|---|" + "---:|" * len(rows)]
        fields: list[Line] = [
            ("presence events (each observer got)",
             lambda r: f"{r['events']} ({'/'.join(map(str, r['observed_events_each']))})"),
            ("window s (churn s)", lambda r: f"{r['seconds']:.2f} ({r['churn_s']:.2f})"),
            ("frames delivered by the nodes", lambda r: f"{r['delivered']:,}"),
            ("node CPU-s, both nodes (each)", lambda r: f"{r['node_cpu_s']:.2f} ("
             + " / ".join(_f(x) for x in r["node_cpu_s_each"]) + ")"),
            ("Redis CPU-ms (INFO cpu), net of idle", lambda r: f"{r['redis_cpu_s'] * 1e3:.1f}, "
             f"{r['redis_cpu_net_s'] * 1e3:.1f}"),
            ("EVALSHA calls, usec per call", lambda r: f"{r['evalsha_calls']:,}, "
             f"{r['evalsha_usec'] / max(1, r['evalsha_calls']):.1f}"),
            ("PUBLISH calls (events + marker)", lambda r: f"{r['publish_calls']:,}"),
            ("load clients CPU-s", lambda r: f"{r['client_cpu_s']:.2f}"),
            ("cores busy: nodes / Redis / clients / controller / others", lambda r: " / ".join(
                _f(r["cores"][k]) for k in ("nodes", "redis", "clients", "controller", "others"))),
            ("checks", lambda r: "ok" if not r["problems"] else f"FAIL ({len(r['problems'])})"),
        ]
        for label, fmt in fields:
            lines.append(f"| {label} | " + " | ".join(fmt(r) for _, r in rows) + " |")
        lines.append("")
    per = report["per_event"]
    if per:
        lines += ["## one presence event (with minus without, same round)", "",
                  "| | " + " | ".join(f"round {p['round']}" for p in per) + " |", "|---|" + "---:|" * len(per)]
        fields2: list[Line] = [
            ("node CPU ms per event (both nodes)", lambda p: _f(p["node_cpu_ms_per_event"])),
            ("node CPU us per delivery", lambda p: _f(p["node_cpu_us_per_delivery"])),
            ("deliveries/s during the with window", lambda p: f"{p['deliveries_per_s']:,.0f}"),
            ("Redis CPU us per event (net of idle; raw)", lambda p: f"{p['redis_cpu_us_per_event']:.1f}; "
             f"{p['redis_cpu_us_per_event_raw']:.1f}"),
            ("Redis script usec per event (commandstats)", lambda p: _f(p["redis_evalsha_usec_per_event"], 1)),
            ("load clients CPU ms per event", lambda p: _f(p["client_cpu_ms_per_event"])),
            ("membership alone (without): Redis CPU us per churn user", lambda p: _f(
                p["membership_redis_cpu_us_per_user"], 1)),
            ("membership alone: EVALSHA per churn user, usec per call (with presence)",
             lambda p: f"{p['membership_evalsha_per_user']:.1f}, {p['membership_evalsha_usec_per_call']:.1f} "
                       f"({p['presence_evalsha_usec_per_call']:.1f})"),
            ("membership alone: node CPU ms per churn user", lambda p: _f(p["membership_node_cpu_ms_per_user"])),
        ]
        for label, fmt in fields2:
            lines.append(f"| {label} | " + " | ".join(fmt(p) for p in per) + " |")
        lines.append("")
    alone = report.get("redis_alone") or {}
    if "error" in alone:
        lines += [f"- FAILED Redis alone: {alone['error']}", ""]
    elif alone:
        lines += [f"## Redis alone: the store's steps, {alone['users_per_block']:,} churn users per block, "
                  f"{len(alone['blocks']['with'])} blocks per mode, {alone['members']:,} members, "
                  f"{NODES} subscribers", "",
                  "| | per event (with minus without) | per churn user, without presence |", "|---|---:|---:|",
                  f"| Redis CPU us (INFO cpu; median of blocks) | {alone['redis_cpu_us_per_event']:.1f} "
                  f"({' / '.join(f'{x:.1f}' for x in alone['redis_cpu_us_per_event_each'])}) "
                  f"| {alone['membership_redis_cpu_us_per_user']:.1f} |",
                  f"| script usec (commandstats EVALSHA) | {alone['script_usec_per_event']:.1f} "
                  f"| {alone['membership_script_usec_per_user']:.1f} |",
                  f"| commands Redis counted, those scripts ran included (EVALSHA) | 1 PUBLISH, in the script | "
                  f"{alone['membership_commands_per_user']:.1f} ({alone['membership_evalsha_per_user']:.1f}) |",
                  f"| wall us per churn user, one at a time: without / with | | "
                  f"{alone['wall_us_per_user']['without']:.0f} / {alone['wall_us_per_user']['with']:.0f} |",
                  f"| checks | {'ok' if not alone['problems'] else 'FAIL'} | |", ""]
    lines += ["Node CPU: utime + stime of both node processes (/proc). Redis CPU: used_cpu_user + used_cpu_sys "
              "(INFO cpu); 'net' subtracts the idle rate measured just before the round (heartbeats) over the "
              "window's length. An event is one join or leave announcement; a delivery one frame to one socket.",
              ""]
    return "\n".join(lines)


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in asdict(base) if getattr(args, k) is not None}
    return replace(base, **given)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smoke sizes (under a minute)")
    p.add_argument("--members", type=int, help=f"anonymous members (quick {QUICK.members}, else {FULL.members})")
    p.add_argument("--users", type=int, help=f"churn users per round (quick {QUICK.users}, else {FULL.users})")
    p.add_argument("--rounds", type=int, help=f"churn rounds per mode (quick {QUICK.rounds}, else {FULL.rounds})")
    p.add_argument("--concurrency", type=int, help=f"churn users at a time ({FULL.concurrency})")
    p.add_argument("--observers", type=int, help=f"observing connections per node ({FULL.observers})")
    p.add_argument("--idle", type=float, help=f"idle window before each round, s (quick {QUICK.idle:g}, "
                                              f"else {FULL.idle:g})")
    p.add_argument("--alone-users", type=int, help=f"Redis alone: churn users per block (quick "
                                                   f"{QUICK.alone_users}, else {FULL.alone_users})")
    p.add_argument("--alone-blocks", type=int, help=f"Redis alone: blocks per mode (quick {QUICK.alone_blocks}, "
                                                    f"else {FULL.alone_blocks})")
    p.add_argument("--no-alone", action="store_true", help="skip the Redis-alone measurement")
    p.add_argument("--end", choices=("leave", "disconnect"), default="leave",
                   help="how a churn user leaves the room: leave_room then close (default), or close only")
    p.add_argument("--modes", default="without,with", help="comma-separated, from without, with")
    p.add_argument("--client", choices=("node", "python"), default="node",
                   help="load client of the members: bench/client/load.js (default) or bench/pyclient.py")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0, help="longest connect of the members, s")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--quiet-below", type=float, default=0.3, metavar="CORES",
                   help="before each round wait until other processes use less (0.3)")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SECONDS",
                   help="longest such wait (10; 0: do not look)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error("--modes: expected some of without, with")
    return args


def failures(report: dict[str, Any]) -> list[str]:
    out = []
    for mode, result in report["results"].items():
        if "error" in result:
            out.append(f"{mode}: {result['error']}")
        for row in result["rounds"]:
            out += [f"{mode} round {row['round']}: {p}" for p in row["problems"]]
    alone = report.get("redis_alone") or {}
    if "error" in alone:
        out.append(f"Redis alone: {alone['error']}")
    out += [f"Redis alone: {p}" for p in alone.get("problems", [])]
    return out


def write(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str)
    path = out / f"presence-{report['started']}.json"
    for target in (path, out / "presence-latest.json"):
        target.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    path = write(report, args.out)
    print(table(report))
    log(f"wrote {path}")
    problems = failures(report)
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
