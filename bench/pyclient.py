"""A pure-Python stand-in for bench/client/load.js (hubnode/baseline protocol only).

Same command line (one JSON argument) and the same JSON-lines conversation on
stdin/stdout, so the controller cannot tell them apart. It needs only aiohttp,
which is why the smoke test uses it; it is far slower than the Node client, so
the real benchmark does not (`python -m bench --client python` to force it).
With `deflate` the clients offer permessage-deflate; with `msgpack` they speak
the `hubnode.msgpack` subprotocol (binary frames, each one msgpack map, every
one decoded).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack

from hubnode.wire import MSGPACK_PROTOCOL

LOG_BASE = math.log(1.01)


class Fleet:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        n = cfg["count"]
        self.counts = [0] * n
        self.warm = [0] * n
        self.open = [False] * n
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.hist: dict[int, int] = {}
        self.lat_count = 0
        self.lat_max = 0.0
        self.closed = 0
        self.closing = False
        self.errors: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.session: aiohttp.ClientSession | None = None

    def send(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def rooms_of(self, i: int) -> list[str]:
        spec = self.cfg.get("rooms") or {}
        rooms = list(spec.get("shared", []))
        if spec.get("mod"):
            rooms.append(f"{spec['modPrefix']}{(self.cfg['start'] + i) % spec['mod']}")
        return rooms

    async def open_one(self, i: int) -> None:
        cfg = self.cfg
        g = cfg["start"] + i
        url = f"{cfg['urls'][g % len(cfg['urls'])]}?user_id={cfg['userPrefix']}{g}"
        assert self.session is not None
        packed = bool(cfg.get("msgpack"))
        ws = await self.session.ws_connect(url, autoping=True, compress=15 if cfg.get("deflate") else 0,
                                           protocols=(MSGPACK_PROTOCOL,) if packed else ())
        if packed and ws.protocol != MSGPACK_PROTOCOL:
            raise RuntimeError(f"the server did not accept {MSGPACK_PROTOCOL}")
        first = self.decode((await ws.receive()).data)
        if first.get("type") != "connected":
            raise RuntimeError(f"unexpected first frame {first}")
        for fid, room in enumerate(self.rooms_of(i), 1):
            join = {"type": "join_room", "data": room, "id": fid}
            await (ws.send_bytes(msgpack.packb(join)) if packed else ws.send_str(json.dumps(join)))
            while True:
                reply = self.decode((await ws.receive()).data)
                if reply.get("id") == fid:
                    break
            if reply.get("type") != "ack":
                raise RuntimeError(f"join refused: {reply}")
        self.sockets.append(ws)
        self.open[i] = True
        self.tasks.append(asyncio.create_task(self.read(i, ws)))

    def decode(self, data: str | bytes) -> Any:
        if self.cfg.get("msgpack"):
            if not isinstance(data, bytes):
                raise RuntimeError(f"a text frame on {MSGPACK_PROTOCOL}: {data!r}")
            return msgpack.unpackb(data)
        return json.loads(data)

    async def read(self, i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        latency = self.cfg.get("latency")
        packed = bool(self.cfg.get("msgpack"))
        kind = aiohttp.WSMsgType.BINARY if packed else aiohttp.WSMsgType.TEXT
        async for msg in ws:
            if msg.type is not kind:
                break
            text = msg.data
            if packed:  # decoded in full: the (slow) reference client checks every frame
                frame = msgpack.unpackb(text)
                mtype = frame.get("type")
            else:
                mtype = "bench" if '"type":"bench"' in text else "warmup" if '"type":"warmup"' in text else ""
            if mtype == "bench":
                now = time.monotonic()
                if not self.received:
                    self.first = now
                self.last = now
                self.received += 1
                self.counts[i] += 1
                if latency:
                    self.record(now - (frame if packed else json.loads(text))["data"]["t"])
            elif mtype == "warmup":
                self.warm[i] += 1
        if not self.closing:
            self.closed += 1

    def record(self, seconds: float) -> None:
        ms = seconds * 1000
        self.lat_count += 1
        self.lat_max = max(self.lat_max, ms)
        bucket = math.ceil(math.log(max(1.0, ms * 1000)) / LOG_BASE)
        self.hist[bucket] = self.hist.get(bucket, 0) + 1

    async def connect(self) -> None:
        # no connection limit: aiohttp's default (100) would hold every socket past the 100th forever
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        pending = iter(range(self.cfg["count"]))
        connect_ms: list[float] = []
        failed = 0
        t0 = time.monotonic()

        async def worker() -> None:
            nonlocal failed
            for i in pending:
                started = time.monotonic()
                try:
                    await asyncio.wait_for(self.open_one(i), self.cfg["timeoutMs"] / 1000)
                    connect_ms.append(round((time.monotonic() - started) * 1000, 2))
                except Exception as exc:
                    failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(repr(exc))

        await asyncio.gather(*(worker() for _ in range(min(self.cfg["concurrency"], self.cfg["count"]))))
        self.send({"event": "ready", "started": t0, "finished": time.monotonic(),
                   "connected": len(connect_ms), "failed": failed, "connectMs": connect_ms,
                   "errors": self.errors})

    def stats(self, full: bool) -> None:
        live = [w for w, ok in zip(self.warm, self.open, strict=True) if ok]
        out: dict[str, Any] = {
            "event": "stats", "received": self.received, "first": self.first, "last": self.last,
            "minPerClient": min(self.counts, default=0), "maxPerClient": max(self.counts, default=0),
            "warmMin": min(live, default=0), "warmTotal": sum(self.warm),
            "latCount": self.lat_count, "latMax": self.lat_max, "hist": self.hist,
            "closed": self.closed, "closeCodes": {}, "errors": self.errors,
        }
        if full:
            out["counts"] = self.counts
        self.send(out)

    def reset(self) -> None:
        self.counts = [0] * self.cfg["count"]
        self.received = 0
        self.first = self.last = 0.0
        self.hist = {}
        self.lat_count = 0
        self.lat_max = 0.0

    async def close(self) -> None:
        self.closing = True
        for ws in self.sockets:
            await ws.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self.send({"event": "closed"})


async def command_loop(fleet: Any, other: Callable[[str], None], limit: int = 2**16) -> None:
    """The line protocol on stdin shared by the load clients: hello, `connect` (in the background),
    `close`; every other command goes to `other`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    fleet.send({"event": "hello"})
    background: set[asyncio.Task[None]] = set()
    while line := (await reader.readline()).decode():
        cmd = line.strip()
        if cmd == "connect":
            task = asyncio.create_task(fleet.connect())
            background.add(task)
            task.add_done_callback(background.discard)
        elif cmd == "close":
            break
        else:
            other(cmd)
    await fleet.close()


async def main() -> None:
    fleet = Fleet(json.loads(sys.argv[1]))

    def other(cmd: str) -> None:
        if cmd in ("stats", "stats full"):
            fleet.stats(cmd == "stats full")
        elif cmd == "reset":
            fleet.reset()
    await command_loop(fleet, other)


if __name__ == "__main__":
    asyncio.run(main())
