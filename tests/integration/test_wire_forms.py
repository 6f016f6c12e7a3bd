"""docs/protocol.md on real sockets: the hubnode.msgpack subprotocol, permessage-deflate
compressed once per node, and the lean socket (no task per connection, one write per batch)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

import hubnode.connection
import hubnode.frames
from hubnode.auth import Identity
from hubnode.connection import Connection, Flusher
from hubnode.frames import Frame
from hubnode.handshake import DEFLATE_RESPONSE
from hubnode.node import Node
from hubnode.policy import ErrorStreak, TokenBucket
from tests.conftest import node_config
from tests.helpers import Client, NodeProcess, wait_until
from tests.integration.test_hub_api import mounted

BIG = "x" * 2000  # over --compress-min-bytes (512)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    proc = NodeProcess("--node-id", "forms").start()
    yield proc
    proc.stop()


class Packed:
    """A hubnode.msgpack client: binary frames both ways."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str, **kw: Any) -> Packed:
        ws = await session.ws_connect(url, protocols=("hubnode.msgpack",), **kw)
        assert ws.protocol == "hubnode.msgpack"
        client = cls(ws)
        assert (await client.recv())["type"] == "connected"
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_bytes(msgpack.packb(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type is aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
        value = msgpack.unpackb(msg.data)
        assert isinstance(value, dict)
        return value

    async def recv_type(self, mtype: str) -> dict[str, Any]:
        while True:
            got = await self.recv()
            if got["type"] == mtype:
                return got


async def test_msgpack_clients_talk_with_json_clients(node: NodeProcess, session: aiohttp.ClientSession) -> None:
    """Every frame of a msgpack connection is a binary msgpack map; JSON clients see the same messages."""
    packed = await Packed.open(session, node.ws_url + "?user_id=mp")
    plain = await Client.open(session, node.ws_url + "?user_id=js")
    await packed.send({"type": "join_room", "data": "forms", "id": 1})
    assert await packed.recv() == {"type": "ack", "id": 1}
    await plain.join("forms")
    await plain.send({"type": "room_message", "data": {"room": "forms", "message": {"n": 1}}})
    got = await packed.recv_type("room_message")
    echo = await plain.recv_type("room_message")
    assert got == echo and got["data"] == {"room": "forms", "message": {"n": 1}}
    await packed.send({"type": "room_message", "data": {"room": "forms", "message": {"n": 2, "text": BIG}}})
    assert (await plain.recv_type("room_message"))["data"]["message"] == {"n": 2, "text": BIG}
    await packed.send({"type": "join_room", "data": "bad room!", "id": "e"})
    error = await packed.recv_type("error")
    assert error["id"] == "e" and error["data"]["code"] == "bad_room"
    await packed.ws.send_bytes(b"\xc1")
    assert (await packed.recv_type("error"))["data"]["code"] == "bad_json"
    await packed.send({"type": "ping", "id": "p", "data": None})
    assert (await packed.recv_type("pong"))["id"] == "p"


async def test_a_text_frame_on_a_msgpack_connection_closes_1003(node: NodeProcess,
                                                              session: aiohttp.ClientSession) -> None:
    packed = await Packed.open(session, node.ws_url + "?user_id=mp2")
    await packed.ws.send_str('{"type":"ping"}')
    msg = await packed.ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003


async def test_deflate_round_trip_with_aiohttp(node: NodeProcess, session: aiohttp.ClientSession) -> None:
    """A client offering deflate gets it; big messages both ways arrive intact (aiohttp inflates them)."""
    a = await Client.open(session, node.ws_url + "?user_id=za", compress=15)
    assert a.ws.compress == 15
    b = await Client.open(session, node.ws_url + "?user_id=zb", compress=15)
    await a.join("zip")
    await b.join("zip")
    for i in range(20):  # compressed frames from the client too, each inflated without context
        await a.send({"type": "room_message", "data": {"room": "zip", "message": {"i": i, "text": BIG}}})
    for i in range(20):
        assert (await b.recv_type("room_message"))["data"]["message"] == {"i": i, "text": BIG}


async def _raw_upgrade(host: str, port: int, path: str, extra: str = ""
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{extra}\r\n").encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    return reader, writer, head


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0, await reader.readexactly(n)


def _masked(payload: bytes, first: int = 0x81) -> bytes:
    key = os.urandom(4)
    body = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", first, 0x80 | len(payload)) + key + body


async def test_deflate_on_the_wire(node: NodeProcess, session: aiohttp.ClientSession) -> None:
    """The node answers with both no_context_takeover parameters and sets RSV1 on big messages only."""
    host, port = "127.0.0.1", int(node.url.rsplit(":", 1)[1])
    reader, writer, head = await _raw_upgrade(host, port, "/ws?user_id=raw",
                                              "Sec-WebSocket-Extensions: permessage-deflate; "
                                              "client_max_window_bits\r\n")
    assert head.startswith("HTTP/1.1 101") and f"Sec-WebSocket-Extensions: {DEFLATE_RESPONSE}" in head
    first, body = await _read_frame(reader)  # connected: small, uncompressed
    assert first == 0x81 and orjson.loads(body)["type"] == "connected"
    writer.write(_masked(orjson.dumps({"type": "join_room", "data": "wire", "id": 1})))
    first, body = await _read_frame(reader)
    assert first == 0x81 and orjson.loads(body) == {"type": "ack", "id": 1}
    for text in ("small", BIG):
        resp = await session.post(f"{node.url}/broadcast", json={"type": "t", "room": "wire", "data": text})
        assert resp.status == 202
        first, body = await _read_frame(reader)
        if text == BIG:
            assert first == 0xC1  # FIN + RSV1 + text
            body = zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")
        else:
            assert first == 0x81
        assert orjson.loads(body)["data"] == text
    writer.close()


async def test_no_compression_declines_deflate(session: aiohttp.ClientSession) -> None:
    proc = NodeProcess("--no-compression").start()
    try:
        client = await Client.open(session, proc.ws_url + "?user_id=n", compress=15)
        assert client.ws.compress == 0
        await client.join("plain")
    finally:
        proc.stop()


async def test_each_message_is_compressed_once_per_node(session: aiohttp.ClientSession,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """40 sockets offering deflate (20 JSON, 20 msgpack) get one message: two compressions, one per form."""
    calls: list[int] = []
    real = hubnode.frames.compress

    def counting(payload: bytes) -> bytes:
        calls.append(len(payload))
        return real(payload)
    monkeypatch.setattr(hubnode.frames, "compress", counting)
    node = Node(node_config())
    async with mounted(node) as url:
        plain = [await Client.open(session, f"{url}?user_id=j{i}", compress=15) for i in range(20)]
        packed = [await Packed.open(session, f"{url}?user_id=m{i}", compress=15) for i in range(20)]
        for c in plain:
            await c.join("once")
        for p in packed:
            await p.send({"type": "join_room", "data": "once", "id": 1})
            assert await p.recv() == {"type": "ack", "id": 1}
        calls.clear()
        assert await node.broadcast_to_room("once", {"type": "big", "data": BIG}) == 1
        for c in plain:
            assert (await c.recv_type("big"))["data"] == BIG
        for p in packed:
            assert (await p.recv_type("big"))["data"] == BIG
        assert len(calls) == 2


async def test_idle_connections_hold_no_task(session: aiohttp.ClientSession) -> None:
    """The lean socket: 60 open, idle connections add no asyncio task (aiohttp kept two each)."""
    node = Node(node_config())
    async with mounted(node) as url:
        first = await Client.open(session, f"{url}?user_id=t0")
        await first.join("idle")
        before = len(asyncio.all_tasks())
        # 60: the session pools at most 100 connections
        clients = [await Client.open(session, f"{url}?user_id=t{i}") for i in range(1, 61)]
        for c in clients:
            await c.join("idle")
        assert len(node.conns) == 61
        # aiohttp's own WebSocket kept two tasks per connection (handler and request loop): 120 here
        await wait_until(lambda: len(asyncio.all_tasks()) < before + 10, 5, what="tasks of finished joins to end")
        assert await node.broadcast_to_room("idle", {"type": "hello"}) == 1
        for c in clients:
            assert (await c.recv_type("hello"))["type"] == "hello"


class _Transport(asyncio.Transport):
    """Records the writes the connection makes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[bytes]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append([bytes(data)])

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append([bytes(d) for d in list_of_data])

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_batch_of_messages_is_one_write_per_socket() -> None:
    """Frames queued in one loop iteration leave in one write, in order (write coalescing)."""
    flusher = Flusher()
    transports = [_Transport() for _ in range(3)]

    async def on_frame(conn: Connection, payload: str | bytes) -> None:
        return None
    conns = [Connection(f"c{i}", Identity(user_id="u"), t, max_outbound=1 << 20,
                        bucket=TokenBucket(0, 1), streak=ErrorStreak(0), flusher=flusher,
                        on_frame=on_frame, on_lost=lambda c: None)
             for i, t in enumerate(transports)]
    frames = [Frame.of({"type": "m", "n": n}) for n in range(50)]
    for frame in frames:
        for conn in conns:
            assert conn.send(frame)
    assert all(t.writes == [] for t in transports)  # nothing written yet
    await wait_until(lambda: all(t.writes for t in transports), 5, what="the flush")
    for t in transports:
        assert len(t.writes) == 1
        assert t.writes[0] == [f.text for f in frames]


class _StuckTransport(_Transport):
    """A transport whose peer stopped reading: close() never completes, only abort() ends it."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.aborted = False
        self.paused = False
        self.eof = False

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _client_bytes(payload: bytes, first: int) -> bytes:
    key = b"\x01\x02\x03\x04"
    return bytes([first, 0x80 | len(payload)]) + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def _bare(transport: asyncio.Transport, lost: list[Connection] | None = None) -> Connection:
    async def on_frame(conn: Connection, payload: str | bytes) -> None:
        return None
    return Connection("c", Identity(user_id="u"), transport, max_outbound=1 << 20, bucket=TokenBucket(0, 1),
                      streak=ErrorStreak(0), flusher=Flusher(), on_frame=on_frame,
                      on_lost=(lost.append if lost is not None else (lambda c: None)), max_message=100)


async def test_a_client_that_closes_and_stops_reading_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's close is answered; if the answer cannot drain, the socket is aborted after CLOSE_TIMEOUT."""
    monkeypatch.setattr(hubnode.connection, "CLOSE_TIMEOUT", 0.05)
    transport = _StuckTransport()
    conn = _bare(transport)
    conn.data_received(_client_bytes(struct.pack("!H", 1000), 0x88))
    assert transport.closed and transport.writes[-1][0][:2] == b"\x88\x02"
    await wait_until(lambda: transport.aborted, 5, what="the abort")


async def test_a_violation_fails_the_connection_and_reads_nothing_more() -> None:
    transport = _StuckTransport()
    conn = _bare(transport)
    conn.data_received(_client_bytes(b"x", 0x83))  # reserved opcode
    # the close frame, then FIN: the socket closes when the peer closes its end (or by the close
    # timer), so no reset destroys the close frame on its way
    assert conn.closing and transport.eof and not transport.paused
    close = transport.writes[-1][0]
    assert close[0] == 0x88 and close[2:4] == b"\x03\xea"  # close 1002
    before = list(transport.writes)
    conn.data_received(_client_bytes(b"", 0x89))  # a ping after the breach is not answered
    conn.data_received(_client_bytes(b'{"type":"ping"}', 0x81))  # nor handled: a frame is read and dropped
    assert transport.writes == before and conn._inbox is None


async def test_a_trickled_partial_frame_is_no_sign_of_life() -> None:
    conn = _bare(_StuckTransport())
    seen = conn.last_seen
    frame = _client_bytes(b'{"type":"ping"}', 0x81)
    await wait_until(lambda: time.monotonic() > seen, 1)
    conn.data_received(frame[:5])
    assert conn.last_seen == seen
    conn.data_received(frame[5:])
    assert conn.last_seen > seen


async def test_a_client_that_goes_on_sending_after_a_violation_still_reads_the_close_code(
        session: aiohttp.ClientSession) -> None:
    """The node fails the connection with FIN and drops what comes after, instead of closing the socket
    under the client: an aiohttp client still sending then found its transport closed and reported
    1006, not the 1003 the node sent (seen in test_fuzz)."""
    node = NodeProcess("--rate", "0").start()
    try:
        for _ in range(3):
            ws = await session.ws_connect(node.ws_url)
            await ws.receive()  # connected
            await ws.send_bytes(b"\x00")  # a binary frame on a JSON connection: 1003
            try:
                for _ in range(2000):  # as a client that has not read the close yet would
                    await ws.send_str('{"type":"ping"}')
            except ConnectionResetError:
                pass
            while (msg := await ws.receive(timeout=10)).type not in (aiohttp.WSMsgType.CLOSE,
                                                                      aiohttp.WSMsgType.CLOSED):
                pass
            assert ws.close_code == 1003, (ws.close_code, msg)
            await ws.close()
    finally:
        node.stop()
