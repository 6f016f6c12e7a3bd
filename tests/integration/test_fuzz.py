"""Property-based fuzzing of a live node: random frames never crash it or disturb others."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
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


async def _episode(node: NodeProcess, batch: list[str | bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        good = await session.ws_connect(f"{node.ws_url}?user_id=good")
        assert orjson.loads((await good.receive(timeout=5)).data)["type"] == "connected"
        await good.send_json({"type": "join_room", "data": "good-room", "id": "g"})
        assert orjson.loads((await good.receive(timeout=5)).data) == {"type": "ack", "id": "g"}
        fuzzer = await session.ws_connect(f"{node.ws_url}?user_id=fuzzer")
        await fuzzer.receive(timeout=5)
        closed = False
        for frame in batch:
            if isinstance(frame, bytes):
                await fuzzer.send_bytes(frame)
            else:
                await fuzzer.send_str(frame)
        if not fuzzer.closed:
            await fuzzer.send_json({"type": "ping", "id": "__end__"})
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
        # a well-behaved client on the same node still receives everything
        resp = await session.post(f"{node.url}/broadcast", json={"type": "check", "room": "good-room"})
        assert resp.status == 202
        while True:
            got = orjson.loads((await good.receive(timeout=5)).data)
            if got["type"] == "check":
                break
        await good.close()
        if not closed:
            await fuzzer.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(frames, min_size=1, max_size=15))
def test_random_frames_never_crash_or_disturb(fuzz_node: NodeProcess, batch: list[str | bytes]) -> None:
    """Random JSON, types, nesting, huge numbers and invalid UTF-8: only well-formed replies, node alive."""
    asyncio.run(_episode(fuzz_node, batch))
    assert fuzz_node.healthy()
