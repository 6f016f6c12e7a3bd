"""Chaos run: no message lost with history on, while a node dies and a subscriber blips.

    .venv/bin/python -m bench.chaos                      # 3 nodes, 3,000 clients, 200 msg/s, 120 s
    .venv/bin/python -m bench.chaos --short              # the same in ~30 s (1,000 clients, 15 s)
    .venv/bin/python -m bench.chaos --duration 60 --clients 2000 --rate 100

Three hubnode nodes on one private redis-server, history on (`--history-size
1000`, docs/protocol.md). Every client (bench/chaosclient.py, aiohttp,
spread over the nodes) has a user id and a few rooms. An external publisher
sends mixed room and user messages at a fixed rate through the history script
(EVALSHA, `publisher.history.publish_call`), and remembers each stream's last
offset and epoch from the script's answers. During the run:

- at `--kill-at` (a third of the way) one node gets SIGKILL: its clients
  reconnect to the other nodes with `?since=<offset>:<epoch>` and rejoin their
  rooms with `{"room": R, "since": {"offset": O, "epoch": E}}`;
- at `--blip-at` (two thirds) another node's subscriber connection is killed
  in Redis (CLIENT LIST finds `name=hubnode:<node-id>:sub`, then CLIENT KILL
  ID <id> TYPE pubsub), so that node must resubscribe and recover by itself.

At the end, per client and per stream: the offsets expected are those after
the client's first position (its first join's ack, or its first `connected`
frame for the user stream) up to the stream's last published offset; lost
are the expected offsets it never received, duplicated the offsets it
received more than once. `resync` messages and recoveries a node refused
(`recovered: false`) are counted too; a loss in a stream whose client got
neither is "unannounced", the one kind docs/protocol.md never allows. A short table goes to stdout and the
whole result to bench/out/chaos-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.chaosclient import MTYPE, user_of
from bench.loadgen import ClientProc
from bench.procs import ROOT, Cpu, cpu_of, python
from bench.publish import Publisher
from bench.systems import HISTORY_SIZE, Deployment, HubHistorySystem, hub_history_available

__all__ = ["main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true",
                   help="a ~30 s run: 1,000 clients, 15 s of publishing (other flags still apply)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--clients", type=int, default=None, help="WebSocket clients (3000; --short 1000)")
    p.add_argument("--rooms", type=int, default=None,
                   help="rooms in all (clients / 10, so about 30 members each)")
    p.add_argument("--rooms-per-client", type=int, default=3)
    p.add_argument("--rate", type=float, default=200.0, help="published messages per second")
    p.add_argument("--room-share", type=float, default=0.5,
                   help="share of the messages that go to a room (the rest to a user)")
    p.add_argument("--duration", type=float, default=None, help="seconds of publishing (120; --short 15)")
    p.add_argument("--kill-at", type=float, default=1 / 3, metavar="FRACTION",
                   help="when the node gets SIGKILL, as a fraction of --duration (negative: never)")
    p.add_argument("--blip-at", type=float, default=2 / 3, metavar="FRACTION",
                   help="when another node's subscriber is killed (negative: never)")
    p.add_argument("--history-size", type=int, default=HISTORY_SIZE)
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--drain", type=float, default=5.0,
                   help="after the last publish, wait until no delivery for this long (seconds)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--no-recover", action="store_true",
                   help="control run: clients reconnect and rejoin without `since` (losses expected)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args(argv)
    if args.clients is None:
        args.clients = 1000 if args.short else 3000
    if args.duration is None:
        args.duration = 15.0 if args.short else 120.0
    if args.rooms is None:
        args.rooms = max(args.rooms_per_client, args.clients // 10)
    if args.nodes < 2:
        p.error("--nodes must be at least 2 (one is killed)")
    return args


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Truth:
    """What the publisher published: per stream, its epochs and offsets (from the script's answers)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[str, int]] = {}  # stream -> (epoch, offset) of its last publish
        self.epochs: dict[str, list[str]] = {}  # stream -> epochs in the order seen
        self.when: dict[tuple[str, str, int], float] = {}  # (stream, epoch, offset) -> seconds into the run
        self.published = Counter[str]()
        self.no_history = 0

    def record(self, stream: str, reply: Any, t: float) -> None:
        _receivers, offset, epoch = reply
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        offset = int(offset)
        self.published[stream.split(":", 1)[0]] += 1
        if offset == 0:
            self.no_history += 1
            return
        epochs = self.epochs.setdefault(stream, [])
        if not epochs or epochs[-1] != epoch:
            epochs.append(epoch)
        self.last[stream] = (epoch, offset)
        self.when[(stream, epoch, offset)] = t


async def publish_loop(system: HubHistorySystem, pub: Publisher, truth: Truth, args: argparse.Namespace,
                       t0: float, rng: random.Random) -> None:
    """`args.rate` messages a second for `args.duration` seconds, on a fixed schedule."""
    count = int(args.rate * args.duration)
    for k in range(count):
        delay = t0 + k / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        data = {"k": k, "t": time.monotonic()}
        if rng.random() < args.room_share:
            room = f"r{rng.randrange(args.rooms)}"
            stream, item = f"room:{room}", system.room(room, data, mtype=MTYPE)
        else:
            user = user_of(rng.randrange(args.clients))
            stream, item = f"user:{user}", system.user(user, data, mtype=MTYPE)
        (reply,) = await pub.publish([item])
        truth.record(stream, reply, time.monotonic() - t0)


async def kill_subscriber(r: aioredis.Redis, node_id: str) -> dict[str, Any]:
    """CLIENT KILL the pub/sub connection named hubnode:<node-id>:sub (found with CLIENT LIST)."""
    name = f"hubnode:{node_id}:sub"
    clients = await r.client_list()
    ids = [c["id"] for c in clients if c.get("name") == name]
    killed = 0
    for cid in ids:
        killed += int(await r.client_kill_filter(_id=cid, _type="pubsub"))  # CLIENT KILL ID <id> TYPE pubsub
    return {"node": node_id, "name": name, "ids": ids, "killed": killed}


async def chaos_events(dep: Deployment, r: aioredis.Redis, args: argparse.Namespace, t0: float,
                       events: list[dict[str, Any]]) -> None:
    """The node kill and the subscriber blip, at their times."""
    node_ids = [f"node{chr(65 + k)}" for k in range(len(dep.nodes))]
    plan: list[tuple[float, str]] = []
    if args.kill_at >= 0:
        plan.append((args.kill_at * args.duration, "kill"))
    if args.blip_at >= 0:
        plan.append((args.blip_at * args.duration, "blip"))
    for at, what in sorted(plan):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic() - t0
        if what == "kill":
            victim = dep.nodes[0]
            victim.popen.send_signal(signal.SIGKILL)
            events.append({"event": "SIGKILL", "node": node_ids[0], "pid": victim.pid, "at_s": now})
            log(f"{now:5.1f} s: SIGKILL {node_ids[0]} (pid {victim.pid})")
        else:
            target = node_ids[1]
            found = await kill_subscriber(r, target)
            events.append({"event": "CLIENT KILL pubsub", **found, "at_s": now})
            log(f"{now:5.1f} s: CLIENT KILL ID {found['ids']} TYPE pubsub ({found['name']}): "
                f"{found['killed']} killed")


class Clients:
    """The chaos client processes, driven as one."""

    def __init__(self, procs: list[ClientProc]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, urls: list[str], args: argparse.Namespace, log_dir: Path) -> Clients:
        n = max(1, min(args.client_processes, args.clients))
        share, extra = divmod(args.clients, n)
        procs: list[ClientProc] = []
        start = 0
        try:
            for k in range(n):
                count = share + (1 if k < extra else 0)
                cfg = {"urls": urls, "start": start, "count": count, "rooms": args.rooms,
                       "roomsPerClient": args.rooms_per_client, "concurrency": 64, "timeoutMs": 60_000,
                       "recover": not args.no_recover}
                name = f"chaos-client{k}"
                procs.append(await ClientProc.spawn([python(), "-m", "bench.chaosclient", json.dumps(cfg)],
                                                    name, log_dir / f"{name}.log"))
                start += count
        except BaseException:
            await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
            raise
        return cls(procs)

    async def ask(self, command: str, event: str, timeout: float) -> list[dict[str, Any]]:
        for p in self.procs:
            p.command(command)
        return list(await asyncio.gather(*(p.expect(event, timeout) for p in self.procs)))

    async def stats(self) -> dict[str, int]:
        replies = await self.ask("stats", "stats", 60)
        return {key: sum(r[key] for r in replies) for key in ("received", "open", "reconnects", "resyncs")}

    def cpu(self) -> Cpu:
        total = Cpu()
        for p in self.procs:
            total = total + p.cpu()
        return total

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)


def count_losses(clients: list[dict[str, Any]], truth: Truth, events: list[dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, Any]:
    """Lost and duplicated offsets per client and stream, against what was published."""
    lost = duplicated = expected = received_with_offset = unannounced = 0
    no_offset = resyncs = not_recovered = recovered = epoch_changes = reconnects = 0
    lost_by_kind = Counter[str]()
    lost_when: list[float] = []
    worst: list[dict[str, Any]] = []
    moved = Counter[str]()
    for c in clients:
        no_offset += c["no_offset"]
        resyncs += c["resyncs"]
        reconnects += c["reconnects"]
        if len(c["nodes"]) > 1:
            moved[f"{c['nodes'][0]}->{c['nodes'][-1]}"] += 1
        for key, s in c["streams"].items():
            duplicated += s["duplicates"]
            not_recovered += s["not_recovered"]
            recovered += s["recovered"]
            epoch_changes += s["epoch_changes"]
            last = truth.last.get(key)
            if last is None or s["start"] is None:
                continue  # nothing published to it (or the client never got a position)
            epoch, top = last
            start_epoch, start = s["start"]
            if start_epoch != epoch:
                # the stream changed epoch after the client's start: count from the new epoch's 1
                start = 0
            seen = {o for a, b in s["seen"].get(epoch, []) for o in range(a, b + 1)}
            want = range(start + 1, top + 1)
            expected += len(want)
            received_with_offset += sum(1 for o in want if o in seen)
            missing = [o for o in want if o not in seen]
            if missing:
                lost += len(missing)
                if not s["not_recovered"] and not c["resyncs"]:
                    unannounced += len(missing)  # no `recovered: false`, no resync: a silent loss
                lost_by_kind[key.split(":", 1)[0]] += len(missing)
                lost_when.extend(truth.when.get((key, epoch, o), -1.0) for o in missing)
                if len(worst) < 10:
                    worst.append({"client": c["user"], "stream": key, "start": start, "top": top,
                                  "missing": missing[:20], "nodes": c["nodes"]})
    windows = {e["event"]: e["at_s"] for e in events}
    near = Counter[str]()
    for t in lost_when:
        label = "elsewhere"
        for name, at in windows.items():
            if at <= t <= at + 10:
                label = f"within 10 s after {name}"
        near[label] += 1
    return {
        "expected": expected, "received": received_with_offset, "lost": lost,
        "lost_unannounced": unannounced,
        "lost_by_kind": dict(lost_by_kind), "lost_near": dict(near), "duplicated": duplicated,
        "resyncs": resyncs, "recovered": recovered, "not_recovered": not_recovered,
        "epoch_changes": epoch_changes, "no_offset": no_offset, "reconnects": reconnects,
        "clients_moved": dict(moved), "examples": worst,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not hub_history_available():
        raise SystemExit("hubnode has no stream history here (publisher.history.publish_call)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = args.out / "logs" / f"chaos-{stamp}"
    system = HubHistorySystem(size=args.history_size, ttl=max(300, int(args.duration * 3)))
    log(f"{args.nodes} nodes with --history-size {args.history_size}, {args.clients:,} clients in "
        f"{args.rooms} rooms ({args.rooms_per_client} each), {args.rate:g} msg/s for {args.duration:g} s")
    dep = await asyncio.to_thread(system.start, args.nodes, log_dir, "chaos")
    assert dep.redis is not None
    r = aioredis.from_url(dep.redis.url, decode_responses=True)
    pub = Publisher(dep)
    clients: Clients | None = None
    events: list[dict[str, Any]] = []
    truth = Truth()
    try:
        clients = await Clients.start(dep.urls, args, log_dir)
        t_connect = time.monotonic()
        ready = await clients.ask("connect", "ready", 300)
        connected = sum(x["connected"] for x in ready)
        log(f"{connected:,}/{args.clients:,} clients connected and joined in "
            f"{time.monotonic() - t_connect:.1f} s")
        if connected != args.clients:
            raise RuntimeError(f"only {connected}/{args.clients} clients ready: "
                               f"{[e for x in ready for e in x['errors']][:5]}")
        nodes0, redis0, clients0 = [cpu_of(p) for p in dep.node_pids], cpu_of(dep.redis.pid), clients.cpu()
        t0 = time.monotonic() + 0.5
        publisher = asyncio.create_task(publish_loop(system, pub, truth, args, t0, random.Random(args.seed)))
        chaos = asyncio.create_task(chaos_events(dep, r, args, t0, events))
        progress = asyncio.create_task(_progress(clients, t0))
        try:
            await publisher
            await chaos
        finally:
            progress.cancel()
        log(f"published {sum(truth.published.values()):,} ({dict(truth.published)}); draining ...")
        stats = await _drain(clients, args.drain, timeout=60)
        seconds = time.monotonic() - t0
        nodes1 = [cpu_of(n.pid) if n.alive() else None for n in dep.nodes]
        redis1, clients1 = cpu_of(dep.redis.pid), clients.cpu()
        reports = await clients.ask("report", "report", 120)
        per_client = [c for rep in reports for c in rep["clients"]]
        latency = _latency([rep["latency"] for rep in reports], t0, events)
        alive = [n.alive() for n in dep.nodes]
        node_metrics = await _node_metrics(dep)
    finally:
        await r.aclose()
        await pub.close()
        if clients is not None:
            await clients.close()
        await asyncio.to_thread(dep.stop)
    counts = count_losses(per_client, truth, events, args)
    return {
        "command": "python -m bench.chaos " + " ".join(sys.argv[1:]), "started": stamp,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "events": events, "published": dict(truth.published), "published_without_history": truth.no_history,
        "streams": len(truth.last),
        "stream_epoch_changes_seen_by_publisher": sum(len(e) - 1 for e in truth.epochs.values()),
        "final": stats, "nodes_alive_at_end": alive, "seconds": seconds,
        "cpu_s": {"redis": (redis1 - redis0).total, "clients": (clients1 - clients0).total,
                  "nodes": [(b - a).total if b is not None else None
                            for a, b in zip(nodes0, nodes1, strict=True)]},
        **counts, "latency": latency, "node_metrics": node_metrics, "logs": str(log_dir),
    }


METRICS = ("hubnode_redis_reconnects", "hubnode_history_recoveries", "hubnode_history_recovered_messages",
           "hubnode_history_unrecovered", "hubnode_resyncs_sent", "hubnode_duplicate_envelopes",
           "hubnode_handoff_overflows", "hubnode_messages_delivered")


async def _node_metrics(dep: Deployment) -> dict[str, dict[str, float]]:
    """The recovery counters of each node still alive (GET /metrics)."""
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as session:
        for k, (node, base) in enumerate(zip(dep.nodes, dep.http, strict=True)):
            if not node.alive():
                continue
            try:
                async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                out[f"node{chr(65 + k)}"] = {"error": str(exc)}  # type: ignore[dict-item]
                continue
            values: dict[str, float] = {}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                name = name.removesuffix("_total")  # Prometheus counters end in _total
                if name in METRICS:
                    values[name.removeprefix("hubnode_")] = float(value)
            out[f"node{chr(65 + k)}"] = values
    return out


def _latency(parts: list[dict[str, Any]], t0: float, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Publish-to-delivery latency over all clients, and where the late deliveries were published."""
    hist = Counter[int]()
    for part in parts:
        for bucket, n in part["hist_ms"].items():
            hist[int(bucket)] += n
    total = sum(hist.values())

    def pct(q: float) -> float:
        seen = 0
        for bucket in sorted(hist):
            seen += hist[bucket]
            if seen >= q * total:
                return float(bucket)
        return float("nan")

    late_near = Counter[str]()
    for part in parts:
        for published in part["late_published"]:
            at = published - t0
            label = "elsewhere"
            for e in events:
                if e["at_s"] - 1 <= at <= e["at_s"] + 10:
                    label = f"published within 10 s after {e['event']}"
            late_near[label] += 1
    return {"deliveries": total, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
            "max_ms": max(p["max_s"] for p in parts) * 1000,
            "late_threshold_ms": 250, "late": sum(p["late_count"] for p in parts), "late_near": dict(late_near)}


async def _progress(clients: Clients, t0: float) -> None:
    while True:
        await asyncio.sleep(5)
        s = await clients.stats()
        log(f"{time.monotonic() - t0:5.1f} s: {s['received']:,} received, {s['open']:,} joined, "
            f"{s['reconnects']:,} reconnects, {s['resyncs']:,} resyncs")


async def _drain(clients: Clients, quiet: float, timeout: float, total: int | None = None,
                 interval: float = 0.5) -> dict[str, int]:
    """Wait until every client is joined again (`total` open, when given) and nothing arrived for `quiet` seconds."""
    end = time.monotonic() + timeout
    last = await clients.stats()
    since = time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(interval)
        s = await clients.stats()
        if s["received"] != last["received"] or s["open"] != last["open"]:
            last, since = s, time.monotonic()
        elif (total is None or s["open"] == total) and time.monotonic() - since >= quiet:
            break
    return last


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = [
        ("nodes / clients / rooms", f"{s['nodes']} / {s['clients']:,} / {s['rooms']:,} "
                                    f"({s['rooms_per_client']} per client)"),
        ("published (room / user)", f"{result['published'].get('room', 0):,} / {result['published'].get('user', 0):,}"
                                    f" at {s['rate']:g}/s for {s['duration']:g} s"),
        ("events", "; ".join(f"{e['event']} {e.get('node', '')} at {e['at_s']:.1f} s" for e in result["events"])),
        ("deliveries expected (with offsets)", f"{result['expected']:,}"),
        ("received", f"{result['received']:,}"),
        ("lost", f"{result['lost']:,} {result['lost_by_kind'] or ''} {result['lost_near'] or ''}".strip()),
        ("  of which unannounced (no recovered:false, no resync)", f"{result['lost_unannounced']:,}"),
        ("duplicated", f"{result['duplicated']:,}"),
        ("resync received", f"{result['resyncs']:,}"),
        ("recoveries: recovered / refused", f"{result['recovered']:,} / {result['not_recovered']:,}"),
        ("reconnects", f"{result['reconnects']:,} ({result['clients_moved']})"),
        ("epoch changes (clients / publisher)",
         f"{result['epoch_changes']:,} / {result['stream_epoch_changes_seen_by_publisher']:,}"),
        ("messages without offset", f"{result['no_offset']:,}"),
        ("latency p50 / p99 / p99.9 / max ms", "{p50_ms:.0f} / {p99_ms:.0f} / {p999_ms:.0f} / {max_ms:.0f}".format(
            **result["latency"])),
        ("late deliveries (>= 250 ms)", f"{result['latency']['late']:,} {result['latency']['late_near'] or ''}"),
        *((f"{node}: subscriber reconnects / stream recoveries / recovered msgs / unrecovered / resyncs",
           " / ".join(_fmt_metric(m.get(k)) for k in ("redis_reconnects", "history_recoveries",
                                                       "history_recovered_messages", "history_unrecovered",
                                                       "resyncs_sent")))
          for node, m in result["node_metrics"].items()),
        ("CPU-s: nodes / Redis / clients",
         f"{[round(x, 1) if x is not None else 'killed' for x in result['cpu_s']['nodes']]} / "
         f"{result['cpu_s']['redis']:.1f} / {result['cpu_s']['clients']:.1f}"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _fmt_metric(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    path = args.out / f"chaos-{result['started']}.json"
    text = json.dumps(result, indent=1, default=str)
    path.write_text(text)
    (args.out / "chaos-latest.json").write_text(text)
    print(table(result))
    log(f"wrote {path}")
    if args.no_recover:
        return 0 if result["lost"] > 0 else 1  # the control must see the losses recovery prevents
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
