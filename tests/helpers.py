"""Shared test machinery: real redis-server and node processes, deadline waits.

Nothing here sleeps to synchronise: every wait is for a condition, with a
deadline scaled by HUB_TEST_TIMEOUT_SCALE on slow machines.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest

SCALE = float(os.environ.get("HUB_TEST_TIMEOUT_SCALE", "1"))
ROOT = Path(__file__).resolve().parent.parent


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds * SCALE


def doc_block(page: str, first_line: str) -> str:
    """The fenced code block of `page` (README.md, docs/protocol.md, ...) whose first line starts with
    `first_line`: documentation examples are run as written, so they cannot drift from the code."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / page).read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"{page} has {len(found)} blocks starting with {first_line!r}"
    return str(found[0])


def missing(reason: str) -> NoReturn:
    """A system dependency is absent: skip, or fail when HUB_TEST_REQUIRE_ALL=1.

    `make test` sets HUB_TEST_REQUIRE_ALL=1 after `make sysdeps` has installed
    everything, so there a missing dependency is a failure, not a silent skip.
    """
    __tracebackhide__ = True  # report the caller's line, not this one
    if os.environ.get("HUB_TEST_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (HUB_TEST_REQUIRE_ALL=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01,
                     what: str = "condition") -> Any:
    """Poll a sync or async predicate until it is truthy; fail after the deadline."""
    end = deadline(timeout)
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    end = deadline(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f}s waiting for {what}")
        time.sleep(0.01)


class Client:
    """A WebSocket test client with deadline-bound receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.connected: dict[str, Any] = {}

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str, **kw: Any) -> Client:
        client = cls(await session.ws_connect(url, **kw))
        first = await client.recv()
        assert first["type"] == "connected", first
        client.connected = first["data"]
        return client

    @property
    def conn_id(self) -> str:
        return str(self.connected["conn_id"])

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_json(frame)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout * SCALE)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}")
        import orjson

        return orjson.loads(msg.data)  # type: ignore[no-any-return]

    async def recv_type(self, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of `mtype`, skipping others (acks of earlier requests, etc.)."""
        end = deadline(timeout)
        while True:
            frame = await self.recv(max(0.01, end - time.monotonic()))
            if frame["type"] == mtype:
                return frame

    async def request(self, mtype: str, data: Any, fid: int | str = 1, timeout: float = 5.0) -> dict[str, Any]:
        """Send a frame with an id and return its answer (ack, error, pong, presence), skipping other frames."""
        await self.send({"type": mtype, "data": data, "id": fid})
        end = deadline(timeout)
        while True:
            frame = await self.recv(max(0.01, end - time.monotonic()))
            if frame.get("id") == fid and frame["type"] in ("ack", "error", "pong", "presence"):
                return frame

    async def join(self, room: str, fid: int | str = "j") -> None:
        reply = await self.request("join_room", room, fid)
        assert reply["type"] == "ack", reply

    async def expect_silence(self, timeout: float = 0.3) -> None:
        """Assert no frame arrives within `timeout` (scaled; used only for negatives)."""
        try:
            msg = await self.ws.receive(timeout=timeout * SCALE)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {msg.type} {msg.data!r}")

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """Read until the close frame; return its code."""
        end = deadline(timeout)
        while True:
            msg = await self.ws.receive(timeout=max(0.01, end - time.monotonic()))
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code if msg.type is not aiohttp.WSMsgType.CLOSE else int(msg.data)
            if msg.type is aiohttp.WSMsgType.ERROR:
                return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """The value of the unlabelled sample `name` in the node's /metrics at `url`."""
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200, resp.status
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class RedisServer:
    """A real redis-server on a free loopback port, restartable on the same port."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.exe = exe
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="hub-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxmemory-policy", "noeviction",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_sync(self.ping, 10, "redis-server to answer PING")
        except BaseException:
            self.stop()
            raise

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Loopback:
    """The URLs of a hub served on 127.0.0.1:`port` (a node process, an example app)."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


class NodeProcess(Loopback):
    """A real `hubnode` process (python -m hubnode.cli) on a free port."""

    def __init__(self, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="hubnode-", suffix=".log")
        os.close(fd)  # no handle kept open here: the child gets its own in start()
        self.log_path = Path(name)

    def start(self, wait: bool = True) -> NodeProcess:
        with self.log_path.open("ab") as log:  # closed here once the child holds its copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hubnode.cli", "--host", "127.0.0.1", "--port", str(self.port),
                 *self.args], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait:
            try:
                wait_until_sync(self.healthy, 15, f"node on port {self.port} to be healthy")
            except BaseException:
                self.stop()  # a node that never came up must not outlive the test
                raise
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return b" 200 " in s.recv(64)
        except OSError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout * SCALE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def raw_ws_connect(port: int, path: str = "/ws", rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client on a plain socket with a tiny receive buffer that reads nothing.

    Used to play a slow consumer: aiohttp's own client would keep reading
    into user space.
    """
    import base64

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError("handshake failed")
        head += chunk
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return sock


def read_frames(sock: socket.socket, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """Read (opcode, payload) server frames until a close frame or EOF."""
    sock.settimeout(timeout * SCALE)
    buf = b""
    frames: list[tuple[int, bytes]] = []
    while True:
        while len(buf) >= 2:
            n, off = buf[1] & 0x7F, 2
            if n == 126:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                break
            frames.append((buf[0] & 0x0F, buf[off:off + n]))
            buf = buf[off + n:]
            if frames[-1][0] == 0x8:
                return frames
        chunk = sock.recv(1 << 20)
        if not chunk:
            return frames
        buf += chunk


def start_all(nodes: Iterable[NodeProcess]) -> None:
    """Start node processes side by side and wait until each is healthy.

    On failure every one of them is stopped: callers only stop nodes that
    started, so none is left behind as an orphan.
    """
    nodes = list(nodes)
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            wait_until_sync(node.healthy, 15, f"node on port {node.port} to be healthy")
    except BaseException:
        for node in nodes:
            node.stop()
        raise


class Cluster:
    """2-3 real node processes sharing one Redis, with quick heartbeats for fault tests."""

    def __init__(self, redis_url: str, prefix: str, n: int = 2, heartbeat: float = 0.5,
                 extra: tuple[str, ...] = ()) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.nodes = [NodeProcess("--redis-url", redis_url, "--key-prefix", prefix, "--node-id", f"n{i + 1}",
                                  "--heartbeat", str(heartbeat), "--unsubscribe-grace", "0.2", "--rate", "0",
                                  "--redis-timeout", "1", *extra) for i in range(n)]

    def start(self) -> Cluster:
        start_all(self.nodes)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def redis_state(client: Any, prefix: str) -> dict[str, Any]:
    """Every membership key under `prefix`, as plain Python values (decode_responses client)."""
    state: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind = client.type(key)
        if kind == "hash":
            state[key] = client.hgetall(key)
        elif kind == "set":
            state[key] = client.smembers(key)
        elif kind == "zset":
            state[key] = client.zrange(key, 0, -1)
    return state


def membership_of(state: dict[str, Any], prefix: str) -> dict[str, dict[str, str]]:
    """room -> {conn_id: user_id} from a redis_state() snapshot."""
    head = f"{prefix}members:{{"
    return {key[len(head):-1]: value for key, value in state.items() if key.startswith(head)}


def sync_redis(url: str) -> Any:
    """A blocking redis-py client that decodes replies, for asserting on Redis state."""
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def only_node_entries(client: Any, prefix: str, nodes: int) -> bool:
    """True when Redis holds nothing under `prefix` but the registry and nodes n1..n<nodes>."""
    allowed = {f"{prefix}nodes"} | {f"{prefix}node:{{n{i}}}" for i in range(1, nodes + 1)}
    return set(redis_state(client, prefix)) <= allowed
