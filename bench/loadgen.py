"""The load generator seen from the controller: several client processes as one fleet.

Each process (bench/client/load.js under Node, or bench/pyclient.py) holds a
slice of the clients and answers commands on stdin with JSON lines on stdout
(the conversation is described at the top of load.js). The fleet splits the
clients, aggregates what the processes report and reads their CPU from /proc,
so every result can say whether the load generator was itself the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Cpu, _raise_nofile, cpu_of, python

__all__ = ["Fleet", "Ready", "Stats", "ensure_node_clients", "percentile_of_hist"]

BENCH_DIR = ROOT / "bench"
LOAD_JS = BENCH_DIR / "client" / "load.js"
LOG_BASE = math.log(1.01)
LINE_LIMIT = 64 * 1024 * 1024


NODE_PACKAGES = ("ws", "socket.io-client", "socket.io", "@socket.io/redis-adapter",
                 "@socket.io/redis-emitter", "redis", "@msgpack/msgpack")


def ensure_node_clients() -> None:
    """Install bench/package.json into bench/node_modules: the load clients' packages
    (ws, socket.io-client, @msgpack/msgpack) and the Node.js Socket.IO server's (socket.io, its Redis
    adapter and emitter, redis)."""
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed: install Node.js >= 18 or use --client python")
    wanted = [BENCH_DIR / "node_modules" / pkg / "package.json" for pkg in NODE_PACKAGES]
    if all(p.exists() for p in wanted):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: it is needed once to install bench/package.json")
    lock = (BENCH_DIR / "package-lock.json").exists()
    subprocess.run([npm, "ci" if lock else "install", "--no-audit", "--no-fund", "--silent"],
                   cwd=BENCH_DIR, check=True)


@dataclass
class Ready:
    """How connecting went, over every client process."""

    connected: int = 0
    failed: int = 0
    started: float = 0.0
    finished: float = 0.0
    connect_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Stats:
    """Deliveries counted by every client process since the last reset."""

    received: int = 0
    first: float = 0.0
    last: float = 0.0
    min_per_client: int = 0
    max_per_client: int = 0
    warm_min: int = 0
    warm_total: int = 0
    lat_count: int = 0
    lat_max: float = 0.0
    hist: dict[int, int] = field(default_factory=dict)
    closed: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    counts: list[int] | None = None

    def latency_ms(self, q: float) -> float:
        return percentile_of_hist(self.hist, q)


def percentile_of_hist(hist: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) in ms of a 1%-bucket log histogram of microseconds."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return math.exp(bucket * LOG_BASE) / 1000
    return math.exp(max(hist) * LOG_BASE) / 1000


class ClientProc:
    """One load-generating process and its JSON-lines conversation."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, argv: list[str], name: str, log: Path) -> ClientProc:
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err, cwd=ROOT, limit=LINE_LIMIT, preexec_fn=_raise_nofile)
        client = cls(proc, name)
        await client.expect("hello", 30)
        return client

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            await self.events.put(json.loads(line))
        await self.events.put({"event": "exit"})

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        while True:
            msg = await asyncio.wait_for(self.events.get(), timeout)
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "exit":
                raise RuntimeError(f"client process {self.name} exited (see its log)")

    def cpu(self) -> Cpu:
        try:
            return cpu_of(self.proc.pid)
        except FileNotFoundError:
            return Cpu()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.command("close")
                await asyncio.wait_for(self.proc.wait(), 30)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()
        self.reader.cancel()


class Fleet:
    """Clients spread over several processes, driven and read as one."""

    def __init__(self, procs: list[ClientProc]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, *, kind: str, proto: str, urls: list[str], total: int, processes: int,
                    log_dir: Path, tag: str, rooms: dict[str, Any] | None = None,
                    user_prefix: str = "u", local_addresses: list[str] | None = None,
                    concurrency: int = 64, latency: bool = False, deflate: bool = False,
                    msgpack: bool = False, timeout: float = 120.0) -> Fleet:
        """Spawn `processes` client processes holding `total` clients (not yet connected)."""
        if kind == "python" and proto != "hub":
            raise ValueError("the Python client speaks only the hubnode protocol")
        processes = max(1, min(processes, total))
        share, extra = divmod(total, processes)
        procs: list[ClientProc] = []
        start = 0
        try:
            for k in range(processes):
                count = share + (1 if k < extra else 0)
                cfg = {"proto": proto, "urls": urls, "start": start, "count": count,
                       "userPrefix": user_prefix, "rooms": rooms or {},
                       "localAddresses": local_addresses or [], "concurrency": concurrency,
                       "latency": latency, "deflate": deflate, "msgpack": msgpack,
                       "timeoutMs": int(timeout * 1000)}
                argv = (["node", str(LOAD_JS), json.dumps(cfg)] if kind == "node"
                        else [python(), "-m", "bench.pyclient", json.dumps(cfg)])
                name = f"{tag}-client{k}"
                procs.append(await ClientProc.spawn(argv, name, log_dir / f"{name}.log"))
                start += count
        except BaseException:
            await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
            raise
        return cls(procs)

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.procs]

    def cpu(self) -> Cpu:
        total = Cpu()
        for p in self.procs:
            total = total + p.cpu()
        return total

    async def connect(self, timeout: float) -> Ready:
        """Open and join every client; returns once every process reported."""
        for p in self.procs:
            p.command("connect")
        replies = await asyncio.gather(*(p.expect("ready", timeout) for p in self.procs))
        ready = Ready(started=min(r["started"] for r in replies),
                      finished=max(r["finished"] for r in replies))
        for r in replies:
            ready.connected += r["connected"]
            ready.failed += r["failed"]
            ready.connect_ms.extend(r["connectMs"])
            ready.errors.extend(r["errors"])
        return ready

    async def stats(self, full: bool = False, timeout: float = 60.0) -> Stats:
        for p in self.procs:
            p.command("stats full" if full else "stats")
        replies = await asyncio.gather(*(p.expect("stats", timeout) for p in self.procs))
        out = Stats(min_per_client=min(r["minPerClient"] for r in replies),
                    max_per_client=max(r["maxPerClient"] for r in replies),
                    warm_min=min(r["warmMin"] for r in replies))
        firsts = [r["first"] for r in replies if r["first"]]
        out.first = min(firsts) if firsts else 0.0
        out.last = max(r["last"] for r in replies)
        for r in replies:
            out.received += r["received"]
            out.warm_total += r["warmTotal"]
            out.lat_count += r["latCount"]
            out.lat_max = max(out.lat_max, r["latMax"])
            for bucket, n in r["hist"].items():
                out.hist[int(bucket)] = out.hist.get(int(bucket), 0) + n
            out.closed += r["closed"]
            for code, n in r["closeCodes"].items():
                out.close_codes[code] = out.close_codes.get(code, 0) + n
            out.errors.extend(r["errors"])
        if full:
            out.counts = [c for r in replies for c in r["counts"]]
        return out

    async def reset(self) -> None:
        for p in self.procs:
            p.command("reset")
        # a stats round trip proves each process handled the reset
        await self.stats()

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)
