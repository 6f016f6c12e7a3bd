"""The servers under test, each started fresh on loopback with its own Redis.

A `System` knows how to start its nodes, which client protocol the load
generator speaks to them, and how an external publisher addresses a room, a
user or everyone: it turns (target, message data) into the bytes a publisher
puts on Redis, exactly as a real worker process would.

- `hubnode`: `hubnode --redis-url ...` nodes; the publisher writes the msgpack
  envelope of docs/redis.md with `publisher.targets.envelope_for`.
  While cluster mode is missing (`hubnode.cluster` not importable) it falls
  back to one node with the embedded broker, published to by `POST /broadcast`.
- `socketio`: python-socketio AsyncServer + AsyncRedisManager
  (bench/servers/sio_server.py); the publisher emits through a write-only
  AsyncRedisManager, capturing the JSON it would PUBLISH.
- `socketio-deflate`: the same server with clients that offer permessage-deflate,
  as browsers and socket.io-client do by default (aiohttp then compresses
  every frame).
- `socketio-node`: Node.js socket.io v4 with @socket.io/redis-adapter
  (bench/servers/sio_node.js), one process per node; the publisher writes what
  a Node.js worker's @socket.io/redis-emitter would PUBLISH (msgpack on the
  adapter's channel), checked once per run against the emitter itself.
- `hubnode-history`: hubnode with `--history-size 1000` (docs/protocol.md,
  history and recovery); the publisher appends through the history script (EVALSHA), as every
  publisher of a stream with history must.
- `hubnode-deflate`: hubnode with load clients that offer permessage-deflate,
  as browsers do (docs/protocol.md: the node compresses each message of
  at least `--compress-min-bytes`, 512, once for all its sockets).
- `hubnode-msgpack`: hubnode with load clients on the `hubnode.msgpack`
  subprotocol (binary frames, one msgpack map each, both ways).
- `socketio-node-deflate`: Node.js Socket.IO started with
  `perMessageDeflate: { threshold: 1024 }`, its clients offering the extension
  (ws then compresses every frame of at least 1 KiB, per socket).
- `baseline`: bench/servers/baseline.py, the bare asyncio floor.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from bench.procs import ROOT, Proc, RedisServer, free_port, port_open, python, wait_for

__all__ = ["DEFAULT_SYSTEMS", "HISTORY_SIZE", "SYSTEMS", "Deployment", "Eval", "Item", "System",
           "available_systems", "hub_cluster_available", "hub_history_available", "make_systems"]


@dataclass(frozen=True)
class Eval:
    """One publish through a Lua script (EVALSHA): hubnode's history script."""

    sha: str
    text: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


# One publish: (channel, payload) for Redis PUBLISH, (url, body) for HTTP, or a script call.
Item = tuple[str, bytes] | Eval

SERVERS = ROOT / "bench" / "servers"
NODE_ARGS = ("--rate", "0", "--ping-interval", "0", "--max-connections", "0",
             "--log-level", "warning")
HISTORY_SIZE = 1000  # --history-size of the hubnode-history system and the chaos run


def hub_cluster_available() -> bool:
    """True once hubnode has cluster mode (hubnode/cluster.py)."""
    return importlib.util.find_spec("hubnode.cluster") is not None


def hub_history_available() -> bool:
    """True once hubnode and the publisher have stream history (docs/protocol.md)."""
    try:
        from publisher import history
    except ImportError:
        return False
    return hasattr(history, "publish_call") and hub_cluster_available()


def _listening(proc: Proc, port: int) -> bool:
    """Whether `proc` listens on `port` yet; raises if it exited."""
    proc.check()
    return port_open(port)


@dataclass
class Deployment:
    """Running nodes (and their Redis) of one system."""

    system: System
    redis: RedisServer | None
    nodes: list[Proc]
    urls: list[str]
    http: list[str] = field(default_factory=list)

    @property
    def node_pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def check(self) -> None:
        for node in self.nodes:
            node.check()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()


class System:
    """A server under test. Subclasses fill in start and the payload builders."""

    name = ""
    label = ""
    proto = "hub"  # the load client's protocol
    cluster = True  # False: one node, published to over HTTP
    deflate = False  # whether the load clients offer permessage-deflate
    msgpack = False  # whether the load clients speak the hubnode.msgpack subprotocol
    scenarios = frozenset({"fanout", "fanout-2k", "p2p", "latency", "idle", "storm", "pubcost", "capacity"})

    def start(self, nodes: int, log_dir: Path, tag: str) -> Deployment:
        redis = RedisServer(log_dir, f"{tag}-redis")
        procs: list[Proc] = []
        urls: list[str] = []
        http: list[str] = []
        try:
            for k in range(nodes):
                port = free_port()
                procs.append(Proc(f"{tag}-node{k}", self.argv(port, redis.url, k), log_dir,
                                  env={"PYTHONUNBUFFERED": "1"}))
                urls.append(self.ws_url(port))
                http.append(f"http://127.0.0.1:{port}")
            for proc, url in zip(procs, http, strict=True):
                port = int(url.rsplit(":", 1)[1])
                wait_for(partial(_listening, proc, port), 30, f"{proc.name} to listen")
        except BaseException:
            for proc in procs:
                proc.stop()
            redis.stop()
            raise
        return Deployment(self, redis, procs, urls, http)

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        raise NotImplementedError

    def ws_url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/ws"

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        raise NotImplementedError

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        raise NotImplementedError

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        raise NotImplementedError


class HubSystem(System):
    name = "hubnode"
    label = "hubnode"
    proto = "hub"

    def __init__(self) -> None:
        from publisher.keys import Keys

        self.keys = Keys("hub:")
        self.cluster = hub_cluster_available()

    def start(self, nodes: int, log_dir: Path, tag: str) -> Deployment:
        if self.cluster:
            return super().start(nodes, log_dir, tag)
        port = free_port()
        proc = Proc(f"{tag}-node0", self.argv(port, "", 0), log_dir, env={"PYTHONUNBUFFERED": "1"})
        wait_for(partial(_listening, proc, port), 30, f"{proc.name} to listen")
        return Deployment(self, None, [proc], [self.ws_url(port)], [f"http://127.0.0.1:{port}"])

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        base = [python(), "-m", "hubnode.cli", "--host", "127.0.0.1", "--port", str(port),
                *NODE_ARGS]
        if not self.cluster:
            return base
        return [*base, "--redis-url", redis_url, "--node-id", f"node{chr(65 + index)}",
                "--key-prefix", "hub:"]

    def _item(self, target: Any, msg: Any) -> Item:
        if not self.cluster:
            return ("/broadcast", orjson.dumps(msg.to_wire()))
        from publisher.targets import envelope_for

        return envelope_for(target, msg, "pub:bench", self.keys)

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        from publisher.message import Message
        from publisher.targets import Target

        return self._item(Target("room", room), Message(mtype, data, room=room).stamped())

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        from publisher.message import Message
        from publisher.targets import Target

        return self._item(Target("user", user), Message(mtype, data, user_id=user).stamped())

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        from publisher.message import Message
        from publisher.targets import Target

        return self._item(Target("all"), Message(mtype, data).stamped())


class HubHistorySystem(HubSystem):
    """hubnode with history on every room and user stream (`--history-size 1000`).

    Publishes to rooms and users go through the history script (EVALSHA of
    publisher/lua/publish.lua, with the keys and arguments
    `publisher.history.publish_call` gives), as every publisher of a stream
    with history must; messages to everyone have no history and stay a plain
    PUBLISH.
    """

    name = "hubnode-history"
    label = "hubnode, history on"
    scenarios = frozenset({"fanout", "p2p", "latency", "pubcost"})

    def __init__(self, size: int = HISTORY_SIZE, ttl: int = 300) -> None:
        super().__init__()
        from publisher.history import HistoryPolicy

        self.size, self.ttl = size, ttl
        self.policy = HistoryPolicy(size=size, ttl=ttl)

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        return [*super().argv(port, redis_url, index), "--history-size", str(self.size),
                "--history-ttl", str(self.ttl)]

    def _item(self, target: Any, msg: Any) -> Item:
        if target.kind == "all":
            return super()._item(target, msg)
        from publisher.history import publish_call
        from publisher.targets import pack_for

        packed = pack_for(target, msg, "pub:bench", self.keys)
        call = publish_call(self.keys, target, packed.channel, packed.payload, packed.id, self.policy)
        return Eval(call.script.sha, call.script.text, tuple(call.keys), tuple(call.args))


class SocketIOSystem(System):
    name = "socketio"
    label = "python-socketio"
    proto = "sio"

    def __init__(self) -> None:
        import socketio

        class Capture(socketio.AsyncRedisManager):  # type: ignore[misc]
            """A write-only manager that hands back what it would PUBLISH."""

            def __init__(self) -> None:
                super().__init__("redis://127.0.0.1:1/0", write_only=True)
                self.captured: list[str] = []

            async def _publish(self, data: Any) -> None:
                self.captured.append(self.json.dumps(data))

        self._manager = Capture()

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        return [python(), "-m", "bench.servers.sio_server", "--port", str(port),
                "--redis-url", redis_url]

    def ws_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def _emit(self, event: str, data: dict[str, Any], room: str | None) -> Item:
        manager = self._manager
        _run_to_end(manager.emit(event, data, room=room))
        return (manager.channel, manager.captured.pop().encode())

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self._emit(mtype, data, room)

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self._emit(mtype, data, f"user:{user}")

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        return self._emit(mtype, data, None)


class SocketIODeflateSystem(SocketIOSystem):
    """python-socketio as a browser meets it: the client offers permessage-deflate.

    socket.io-client (like every browser) offers the extension and aiohttp
    accepts it, so the server compresses every frame. Only the delivery
    scenarios: an idle socket gets its compressor lazily, a storm says nothing new.
    """

    name = "socketio-deflate"
    label = "python-socketio, deflate"
    deflate = True
    scenarios = frozenset({"fanout", "fanout-2k", "p2p", "latency"})


class SocketIONodeSystem(System):
    """Node.js socket.io v4 + @socket.io/redis-adapter, one process per node.

    The external publisher emits the way a Node.js worker does with
    @socket.io/redis-emitter: `[uid, packet, opts]` in msgpack (notepack.io)
    on `socket.io#/#`, or `socket.io#/#<room>#` for one room. The bytes are
    built here with msgpack and compared once, at construction, with what the
    emitter in bench/node_modules produces for the same emits.
    """

    name = "socketio-node"
    label = "Node.js Socket.IO"
    proto = "sio"
    KEY = "socket.io"
    NSP = "/"
    UID = "emitter"  # the emitter's uid: every adapter node takes it as foreign
    EVENT = 2  # socket.io-parser PacketType.EVENT

    def __init__(self) -> None:
        check_node_emitter(self)

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        return ["node", str(SERVERS / "sio_node.js"), "--port", str(port), "--redis-url", redis_url]

    def ws_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def emit(self, event: str, data: Any, room: str | None) -> tuple[str, bytes]:
        """What `emitter.to(room).emit(event, data)` (or `.emit` for None) would PUBLISH."""
        import msgpack

        rooms = [room] if room is not None else []
        packet = {"type": self.EVENT, "data": [event, data], "nsp": self.NSP}
        opts = {"rooms": rooms, "flags": {}, "except": []}
        channel = f"{self.KEY}#{self.NSP}#" + (f"{room}#" if room is not None else "")
        return (channel, msgpack.packb([self.UID, packet, opts]))

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self.emit(mtype, data, room)

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return self.emit(mtype, data, f"user:{user}")

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        return self.emit(mtype, data, None)


class HubDeflateSystem(HubSystem):
    """hubnode as a browser meets it: the load clients offer permessage-deflate.

    The node accepts (`server_no_context_takeover; client_no_context_takeover`)
    and compresses each message of at least `--compress-min-bytes` (512) once
    for all its sockets; smaller ones go plain. Only fan-out: its 100-byte
    messages show what negotiating costs, the 2 KB ones what compressing costs.
    """

    name = "hubnode-deflate"
    label = "hubnode, clients offer deflate"
    deflate = True
    scenarios = frozenset({"fanout", "fanout-2k"})


class HubMsgpackSystem(HubSystem):
    """hubnode with load clients on the `hubnode.msgpack` subprotocol (binary msgpack frames both ways).

    Point-to-point too: there the node's msgpack form of a message serves one socket.
    """

    name = "hubnode-msgpack"
    label = "hubnode, msgpack"
    msgpack = True
    scenarios = frozenset({"fanout", "fanout-2k", "p2p"})


class SocketIONodeDeflateSystem(SocketIONodeSystem):
    """Node.js Socket.IO with `perMessageDeflate: { threshold: 1024 }`, its clients offering it.

    ws compresses every frame of at least 1 KiB for each socket on its own
    (context takeover: a zlib stream per socket), as a browser-facing Socket.IO
    server with compression turned on does.
    """

    name = "socketio-node-deflate"
    label = "Node.js Socket.IO, deflate"
    deflate = True
    THRESHOLD = 1024
    scenarios = frozenset({"fanout", "fanout-2k"})

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        return [*super().argv(port, redis_url, index), "--deflate", str(self.THRESHOLD)]


def check_node_emitter(system: SocketIONodeSystem) -> None:
    """Compare our emitter bytes with @socket.io/redis-emitter's; raise if they differ.

    Data without integral floats: notepack writes 2.0 as an integer, msgpack
    as a float64 (both decode to the same JavaScript number).
    """
    samples: list[tuple[str | None, str, Any]] = [
        ("room1", "bench", {"seq": 7, "t": 12345.678, "pad": "x" * 60}),
        ("user:u42", "bench", {"seq": 300, "t": -0.5, "pad": "y" * 300, "ok": True, "n": None}),
        (None, "warmup", {"w": 65536, "list": [1, -1, -200, 70000, 2**40]}),
    ]
    try:
        out = subprocess.run(["node", str(SERVERS / "emit_sample.js"), json.dumps(samples)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT / "bench", check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"could not run bench/servers/emit_sample.js (npm ci in bench/?): {exc}") from exc
    theirs = [json.loads(line) for line in out.stdout.splitlines()]
    ours = [system.emit(event, data, room) for room, event, data in samples]
    if len(theirs) != len(ours):
        raise RuntimeError(f"@socket.io/redis-emitter published {len(theirs)} messages for {len(ours)} emits")
    for (channel, payload), t in zip(ours, theirs, strict=True):
        if channel != t["channel"] or payload.hex() != t["hex"]:
            raise RuntimeError(f"the emitter format changed: we build {channel} {payload.hex()}, "
                               f"@socket.io/redis-emitter {t['channel']} {t['hex']}")


class BaselineSystem(System):
    name = "baseline"
    label = "bare asyncio"
    proto = "hub"

    def argv(self, port: int, redis_url: str, index: int) -> list[str]:
        return [python(), "-m", "bench.servers.baseline", "--port", str(port),
                "--redis-url", redis_url]

    @staticmethod
    def _json(mtype: str, data: dict[str, Any], **extra: str) -> bytes:
        return orjson.dumps({"type": mtype, "data": data, **extra})

    def room(self, room: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return (f"base:room:{room}", self._json(mtype, data, room=room))

    def user(self, user: str, data: dict[str, Any], mtype: str = "bench") -> Item:
        return (f"base:user:{user}", self._json(mtype, data, user_id=user))

    def everyone(self, data: dict[str, Any], mtype: str = "warmup") -> Item:
        return ("base:all", self._json(mtype, data))


SYSTEMS: dict[str, type[System]] = {
    "hubnode": HubSystem, "hubnode-history": HubHistorySystem, "socketio": SocketIOSystem,
    "socketio-node": SocketIONodeSystem, "socketio-deflate": SocketIODeflateSystem,
    "baseline": BaselineSystem, "hubnode-deflate": HubDeflateSystem, "hubnode-msgpack": HubMsgpackSystem,
    "socketio-node-deflate": SocketIONodeDeflateSystem,
}
DEFAULT_SYSTEMS = tuple(SYSTEMS)


def available_systems(names: Sequence[str] = DEFAULT_SYSTEMS) -> list[str]:
    """`names` less those this checkout cannot run (hubnode-history before history exists)."""
    return [n for n in names if n != "hubnode-history" or hub_history_available()]


def make_systems(names: Sequence[str]) -> list[System]:
    return [SYSTEMS[name]() for name in names]


def _run_to_end(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a write-only emit into a capture) inline."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the write-only emit suspended: python-socketio changed")
