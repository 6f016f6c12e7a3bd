"""One client process of the chaos run (bench/chaos.py): WebSocket clients that recover.

Each client has a user id and a few rooms, and follows docs/protocol.md
to the letter: it tracks the offset and epoch of each of its streams (its
rooms and its user), and when its connection drops it reconnects to another
node with `?since=<offset>:<epoch>` for the user stream and joins each room
with `{"room": R, "since": {"offset": O, "epoch": E}}`. It records every
offset it receives, per stream and epoch, and counts duplicates, `resync`
messages and recoveries the node refused (`recovered: false`).

Started with one JSON argument; talks to the controller over stdin/stdout in
JSON lines, like bench/pyclient.py:

    -> {"event": "hello"}
    <- "connect"   -> {"event": "ready", "connected", "failed", "errors"}
    <- "stats"     -> {"event": "stats", "received", "open", "reconnects", "resyncs", ...}
    <- "report"    -> {"event": "report", "clients": [...]} (offsets as [first, last] ranges)
    <- "close"     -> {"event": "closed"}, then exits
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from bench.pyclient import command_loop

MTYPE = "chaos"
LATE_S = 0.25  # a delivery this long after its publish is "late" (it came through a recovery)
LATE_KEEP = 5000  # publish times of late deliveries kept per process


def rooms_of(g: int, rooms: int, per_client: int) -> list[str]:
    """The rooms of client `g` (global index): `per_client` rooms spread evenly over `rooms`."""
    step = max(1, rooms // per_client)
    return sorted({f"r{(g + k * step) % rooms}" for k in range(per_client)})


def user_of(g: int, prefix: str = "c") -> str:
    return f"{prefix}{g}"


def ranges(offsets: set[int]) -> list[list[int]]:
    """Sorted offsets as [first, last] runs."""
    out: list[list[int]] = []
    for o in sorted(offsets):
        if out and o == out[-1][1] + 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return out


@dataclass
class Stream:
    """What one client knows of one of its streams."""

    start: tuple[str, int] | None = None  # (epoch, offset) of its first position
    epoch: str | None = None  # current epoch
    offset: int = 0  # highest offset received (or acked) in `epoch`
    seen: dict[str, set[int]] = field(default_factory=dict)
    duplicates: int = 0
    epoch_changes: int = 0
    not_recovered: int = 0
    recovered: int = 0

    def _move(self, epoch: str, offset: int) -> None:
        if self.epoch is not None and epoch != self.epoch:
            self.epoch_changes += 1
            self.epoch, self.offset = epoch, offset
        else:
            self.epoch, self.offset = epoch, max(self.offset, offset)

    def position(self, epoch: str | None, offset: int) -> None:
        """A position from a `connected` frame or an ack (not a message)."""
        if epoch is None:
            return
        if self.start is None:
            self.start = (epoch, offset)
        self._move(epoch, offset)

    def message(self, epoch: str, offset: int) -> None:
        if self.start is None:  # a message before any position: start just below it
            self.start = (epoch, offset - 1)
        self._move(epoch, offset)
        seen = self.seen.setdefault(epoch, set())
        if offset in seen:
            self.duplicates += 1
        else:
            seen.add(offset)

    def since(self) -> dict[str, Any] | None:
        return None if self.epoch is None else {"offset": self.offset, "epoch": self.epoch}


class Client:
    def __init__(self, fleet: Fleet, g: int) -> None:
        cfg = fleet.cfg
        self.fleet = fleet
        self.g = g
        self.user = user_of(g, cfg.get("userPrefix", "c"))
        self.rooms = rooms_of(g, cfg["rooms"], cfg["roomsPerClient"])
        self.streams: dict[str, Stream] = {f"user:{self.user}": Stream()}
        for room in self.rooms:
            self.streams[f"room:{room}"] = Stream()
        self.received = 0
        self.no_offset = 0
        self.resyncs = 0
        self.reconnects = 0
        self.connects = 0
        self.close_codes: dict[str, int] = {}
        self.nodes: list[str] = []  # node id of each connection, in order
        self.errors: list[str] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.joined = False  # connected and in every room
        self.ready = asyncio.Event()  # joined once
        self.connected = asyncio.Event()
        self.shift = 0  # which node: urls[(g + shift) % len(urls)]
        self.task: asyncio.Task[None] | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1

    def note(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)

    # -- the connection's life --------------------------------------------------------

    async def run(self) -> None:
        urls = self.fleet.cfg["urls"]
        failures = 0
        while not self.fleet.closing:
            url = urls[(self.g + self.shift) % len(urls)]
            try:
                await self.session(url)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused (a dead node), 503, a failed join: try another node
                self.note(f"{type(exc).__name__}: {exc}"[:200])
                failures += 1
            if self.fleet.closing:
                return
            self.reconnects += 1
            # another node next time (any other: the clients of a dead node spread over the rest)
            self.shift += 1 + random.randrange(max(1, len(urls) - 1))
            await asyncio.sleep(random.uniform(0.05, 0.5) * min(4, 1 + failures))

    async def session(self, url: str) -> None:
        user = self.streams[f"user:{self.user}"]
        query = f"?user_id={quote(self.user)}"
        since = user.since() if self.fleet.recover else None
        if since is not None:
            query += f"&since={since['offset']}:{quote(since['epoch'])}"
        assert self.fleet.session is not None
        ws = await self.fleet.session.ws_connect(url + query, autoping=True, max_msg_size=0)
        self.ws = ws
        self.connected = asyncio.Event()
        reader = asyncio.create_task(self.read(ws))
        hello = asyncio.create_task(asyncio.wait_for(self.hello(ws), self.fleet.cfg["timeoutMs"] / 1000))
        try:
            await asyncio.wait({reader, hello}, return_when=asyncio.FIRST_COMPLETED)
            if not hello.done():
                raise ConnectionError(f"closed before joined (code {ws.close_code})")
            hello.result()
            self.joined = True
            self.ready.set()
            await reader
        finally:
            self.joined = False
            for task in (reader, hello):
                task.cancel()
            await asyncio.gather(reader, hello, return_exceptions=True)
            self.pending.clear()
            self.ws = None
            if not ws.closed:
                await ws.close()
        code = str(ws.close_code)
        self.close_codes[code] = self.close_codes.get(code, 0) + 1

    async def hello(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Wait for `connected` (the reader handles it), then join every room, recovering."""
        await self.connected.wait()
        for room in self.rooms:
            stream = self.streams[f"room:{room}"]
            for tries in range(20):
                since = stream.since() if self.fleet.recover else None
                data: Any = room if since is None else {"room": room, "since": since}
                reply = await self.request(ws, {"type": "join_room", "data": data})
                if reply.get("type") == "ack":
                    d = reply.get("data") or {}
                    if since is not None:
                        if d.get("recovered") is True:
                            stream.recovered += 1
                        else:
                            stream.not_recovered += 1
                    if isinstance(d, dict) and "offset" in d:
                        stream.position(d.get("epoch"), int(d["offset"]))
                    break
                code = (reply.get("data") or {}).get("code")
                if code != "unavailable" or tries == 19:
                    raise RuntimeError(f"join {room} refused: {reply}")
                await asyncio.sleep(0.25)

    async def request(self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any]) -> dict[str, Any]:
        fid = self.next_id
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[fid] = fut
        await ws.send_str(orjson.dumps({**frame, "id": fid}).decode())
        try:
            return await fut
        finally:
            self.pending.pop(fid, None)

    async def read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = orjson.loads(msg.data)
            ftype = frame.get("type")
            if ftype == MTYPE:
                self.delivered(frame)
            elif ftype == "connected":
                self.connects += 1
                data = frame.get("data") or {}
                self.nodes.append(str(data.get("node")))
                user = self.streams[f"user:{self.user}"]
                if user.epoch is not None and "recovered" in data:
                    if data["recovered"] is True:
                        user.recovered += 1
                    else:
                        user.not_recovered += 1
                if "offset" in data:
                    user.position(data.get("epoch"), int(data["offset"]))
                self.connected.set()
            elif ftype in ("ack", "error") and frame.get("id") in self.pending:
                self.pending[frame["id"]].set_result(frame)
            elif ftype == "system_message":
                event = (frame.get("data") or {}).get("event")
                if event == "resync":
                    self.resyncs += 1
            elif ftype == "error":
                self.note(json.dumps(frame)[:200])

    def delivered(self, frame: dict[str, Any]) -> None:
        self.received += 1
        self.fleet.received += 1
        data = frame.get("data")
        if isinstance(data, dict) and isinstance(data.get("t"), float):
            self.fleet.latency(time.monotonic() - data["t"], data["t"])
        offset, epoch = frame.get("offset"), frame.get("epoch")
        room = frame.get("room")
        key = f"room:{room}" if room is not None else f"user:{self.user}"
        stream = self.streams.get(key)
        if stream is None:
            self.note(f"a message for {key}, not one of this client's streams")
            return
        if not isinstance(offset, int) or not isinstance(epoch, str):
            self.no_offset += 1
            return
        stream.message(epoch, offset)

    def report(self) -> dict[str, Any]:
        return {
            "g": self.g, "user": self.user, "received": self.received, "no_offset": self.no_offset,
            "resyncs": self.resyncs, "reconnects": self.reconnects, "connects": self.connects,
            "nodes": self.nodes, "close_codes": self.close_codes, "errors": self.errors,
            "streams": {key: {"start": s.start, "epoch": s.epoch, "offset": s.offset,
                              "seen": {e: ranges(o) for e, o in s.seen.items()},
                              "duplicates": s.duplicates, "epoch_changes": s.epoch_changes,
                              "recovered": s.recovered, "not_recovered": s.not_recovered}
                        for key, s in self.streams.items()},
        }


class Fleet:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.clients = [Client(self, cfg["start"] + i) for i in range(cfg["count"])]
        self.session: aiohttp.ClientSession | None = None
        self.closing = False
        self.received = 0
        self.recover = bool(cfg.get("recover", True))  # False: a control run that rejoins without `since`
        self.lat_hist: dict[int, int] = {}  # 1 ms buckets up to 10 s, then one bucket
        self.lat_max = 0.0
        self.late: list[float] = []  # publish times (time.monotonic) of late deliveries
        self.late_count = 0

    def latency(self, seconds: float, published: float) -> None:
        ms = int(seconds * 1000)
        bucket = min(ms, 10_000)
        self.lat_hist[bucket] = self.lat_hist.get(bucket, 0) + 1
        self.lat_max = max(self.lat_max, seconds)
        if seconds >= LATE_S:
            self.late_count += 1
            if len(self.late) < LATE_KEEP:
                self.late.append(published)

    def send(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def connect(self) -> None:
        """Start every client (at most `concurrency` connecting at once); report when all are ready."""
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        gate = asyncio.Semaphore(self.cfg["concurrency"])
        t0 = time.monotonic()
        timeout = self.cfg["timeoutMs"] / 1000

        async def start(c: Client) -> bool:
            async with gate:
                c.task = asyncio.create_task(c.run())
                try:
                    await asyncio.wait_for(c.ready.wait(), timeout)
                    return True
                except TimeoutError:
                    return False

        ok = await asyncio.gather(*(start(c) for c in self.clients))
        errors = [e for c in self.clients for e in c.errors][:10]
        self.send({"event": "ready", "started": t0, "finished": time.monotonic(),
                   "connected": sum(ok), "failed": len(ok) - sum(ok), "errors": errors})

    def stats(self) -> None:
        self.send({"event": "stats", "received": self.received,
                   "open": sum(1 for c in self.clients if c.joined),
                   "reconnects": sum(c.reconnects for c in self.clients),
                   "resyncs": sum(c.resyncs for c in self.clients)})

    def report(self) -> None:
        self.send({"event": "report", "clients": [c.report() for c in self.clients],
                   "latency": {"hist_ms": self.lat_hist, "max_s": self.lat_max,
                               "late_count": self.late_count, "late_published": self.late}})

    async def close(self) -> None:
        self.closing = True
        tasks = [c.task for c in self.clients if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self.send({"event": "closed"})


async def main() -> None:
    fleet = Fleet(json.loads(sys.argv[1]))

    def other(cmd: str) -> None:
        if cmd == "stats":
            fleet.stats()
        elif cmd == "report":
            fleet.report()
    await command_loop(fleet, other, limit=2**20)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
