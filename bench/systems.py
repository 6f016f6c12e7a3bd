"""The servers under test, each started fresh on loopback with its own Redis.

A `System` knows how to start its nodes, which client protocol the load
generator speaks to them, and how an external publisher addresses a room, a
user or everyone: it turns (target, message data) into the bytes a publisher
puts on Redis, exactly as a real worker process would.

- `hubnode`: `hubnode --redis-url ...` nodes; the publisher writes the msgpack
  envelope of PROTOCOL.md section 7 with `publisher.targets.envelope_for`.
  While cluster mode is missing (`hubnode.cluster` not importable) it falls
  back to one node with the embedded broker, published to by `POST /broadcast`.
- `socketio`: python-socketio AsyncServer + AsyncRedisManager
  (bench/servers/sio_server.py); the publisher emits through a write-only
  AsyncRedisManager, capturing the JSON it would PUBLISH.
- `socketio-deflate`: the same server with clients that offer permessage-deflate,
  as browsers and socket.io-client do by default (aiohttp then compresses
  every frame).
- `baseline`: bench/servers/baseline.py, the bare asyncio floor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.procs import Proc, RedisServer, free_port, port_open, python, wait_for

__all__ = ["SYSTEMS", "Deployment", "Item", "System", "hub_cluster_available"]

# One publish: (channel, payload) for Redis, or (url, body) for HTTP.
Item = tuple[str, bytes]

NODE_ARGS = ("--rate", "0", "--ping-interval", "0", "--max-connections", "0",
             "--log-level", "warning")


def hub_cluster_available() -> bool:
    """True once hubnode has cluster mode (hubnode/cluster.py)."""
    return importlib.util.find_spec("hubnode.cluster") is not None


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
    scenarios = frozenset({"fanout", "p2p", "latency", "idle", "storm"})

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
                wait_for(lambda p=proc, port=port: p.check() or port_open(port), 30,  # type: ignore[misc]
                         f"{proc.name} to listen")
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
        wait_for(lambda: proc.check() or port_open(port), 30, f"{proc.name} to listen")
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
    scenarios = frozenset({"fanout", "p2p", "latency"})


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
    "hubnode": HubSystem, "socketio": SocketIOSystem, "socketio-deflate": SocketIODeflateSystem,
    "baseline": BaselineSystem,
}


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
