"""Property-based fuzzing of a live node: random frames never crash it or disturb others."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import NodeProcess

TYPES = ["join_room", "leave_room", "broadcast", "room_message", "private_message", "ping", "zap", "", "ack"]
KNOWN_REPLIES = {"error", "ack", "pong", "broadcast", "room_message", "private_message", "connected",
                 "system_message"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)
names = st.text(max_size=140) | st.sampled_from(["lobby", "a b", "{x}", "", "x" * 129, "ok-room"])
shaped = st.fixed_dictionaries({"type": st.sampled_from(TYPES)}, optional={
    "data": json_values | names | st.fixed_dictionaries({"room": names, "message": json_values})
    | st.fixed_dictionaries({"user_id": names, "message": json_values}),
    "id": st.integers(-5, 10**6) | st.text(max_size=8) | st.floats() | st.booleans(),
})


def text_frame(value: Any) -> str:
    return orjson.dumps(value).decode()


frames = st.one_of(
    shaped.map(text_frame),
    json_values.map(text_frame),
    st.text(max_size=200),  # not JSON
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(300, 2000).map(lambda n: '{"type":"ping","data":' + "9" * n + "}"),  # huge numbers
    st.binary(max_size=100).map(lambda b: b"\xff" + b),  # invalid UTF-8, sent as a binary frame
)


@pytest.fixture(scope="module")
def fuzz_node() -> Iterator[NodeProcess]:
    node = NodeProcess("--rate", "0", "--max-message-bytes", "16384", "--node-id", "fuzz").start()
    yield node
    node.stop()


async def _still_served(session: aiohttp.ClientSession, node: NodeProcess,
                        good: aiohttp.ClientWebSocketResponse) -> None:
    """A well-behaved client on the same node still receives everything."""
    resp = await session.post(f"{node.url}/broadcast", json={"type": "check", "room": "good-room"})
    assert resp.status == 202
    while True:
        got = orjson.loads((await good.receive(timeout=5)).data)
        if got["type"] == "check":
            break
    await good.close()


async def _episode(node: NodeProcess, batch: list[str | bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        good = await session.ws_connect(f"{node.ws_url}?user_id=good")
        assert orjson.loads((await good.receive(timeout=5)).data)["type"] == "connected"
        await good.send_json({"type": "join_room", "data": "good-room", "id": "g"})
        assert orjson.loads((await good.receive(timeout=5)).data) == {"type": "ack", "id": "g"}
        fuzzer = await session.ws_connect(f"{node.ws_url}?user_id=fuzzer")
        await fuzzer.receive(timeout=5)
        closed = False
        try:
            for frame in batch:
                if isinstance(frame, bytes):
                    await fuzzer.send_bytes(frame)
                else:
                    await fuzzer.send_str(frame)
            if not fuzzer.closed:
                await fuzzer.send_json({"type": "ping", "id": "__end__"})
        except ConnectionResetError:
            pass  # the node closed on a frame sent before (a binary one, say): its close frame is read below
        while True:
            msg = await fuzzer.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                closed = True
                assert fuzzer.close_code in (1003, 1007, 1008, 1009), fuzzer.close_code
                break
            assert msg.type is aiohttp.WSMsgType.TEXT
            reply = orjson.loads(msg.data)
            assert isinstance(reply, dict) and reply.get("type") in KNOWN_REPLIES, reply
            if reply["type"] == "error":
                assert set(reply["data"]) == {"code", "message"}
            if reply.get("id") == "__end__" and reply["type"] == "pong":
                break
        await _still_served(session, node, good)
        if not closed:
            await fuzzer.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(frames, min_size=1, max_size=15))
@example(batch=[b"\xff", '{"type":"join_room"}', ""])  # closed by the first frame while the rest are sent
def test_random_frames_never_crash_or_disturb(fuzz_node: NodeProcess, batch: list[str | bytes]) -> None:
    """Random JSON, types, nesting, huge numbers and invalid UTF-8: only well-formed replies, node alive."""
    asyncio.run(_episode(fuzz_node, batch))
    assert fuzz_node.healthy()


# -- raw bytes on the lean socket: the node parses WebSocket frames itself ---------------
def _raw_frame(op: int, payload: bytes, fin: bool, rsv: int, masked: bool, length_lie: int) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload)
    shown = max(0, n + length_lie)
    if shown < 126:
        head = bytes([first, (0x80 if masked else 0) | shown])
    elif shown < 65536:
        head = bytes([first, (0x80 if masked else 0) | 126]) + shown.to_bytes(2, "big")
    else:
        head = bytes([first, (0x80 if masked else 0) | 127]) + shown.to_bytes(8, "big")
    key = b"\x01\x02\x03\x04" if masked else b""
    body = bytes(c ^ key[i % 4] for i, c in enumerate(payload)) if masked else payload
    return head + key + body


raw_frames = st.builds(
    _raw_frame, st.integers(0, 15), st.binary(max_size=200), st.booleans(), st.integers(0, 7),
    st.booleans(), st.sampled_from([0, 0, 0, 1, -1, 70000])) | st.binary(max_size=64)


async def _raw_episode(node: NodeProcess, batch: list[bytes]) -> None:
    host, port = "127.0.0.1", int(node.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        good = await session.ws_connect(f"{node.ws_url}?user_id=good")
        assert orjson.loads((await good.receive(timeout=5)).data)["type"] == "connected"
        await good.send_json({"type": "join_room", "data": "good-room", "id": "g"})
        assert orjson.loads((await good.receive(timeout=5)).data) == {"type": "ack", "id": "g"}
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /ws?user_id=raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        for frame in batch:
            writer.write(frame)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
        await _still_served(session, node, good)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(raw_frames, min_size=1, max_size=12))
def test_random_raw_frames_never_crash_or_disturb(fuzz_node: NodeProcess, batch: list[bytes]) -> None:
    """Bad opcodes, reserved bits, unmasked frames, lying lengths, garbage deflate: the node stays up."""
    asyncio.run(_raw_episode(fuzz_node, batch))
    assert fuzz_node.healthy()
    assert "Traceback" not in fuzz_node.output(), fuzz_node.output()[-2000:]
