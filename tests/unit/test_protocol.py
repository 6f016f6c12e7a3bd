"""Frame parsing for every valid type and every error code; frame encoding."""

from __future__ import annotations

import orjson
import pytest

from hubnode.errors import CloseCode, ErrorCode
from hubnode.protocol import (
    Broadcast,
    JoinRoom,
    LeaveRoom,
    Ping,
    PrivateMessage,
    ProtocolError,
    RoomMessage,
    encode_ack,
    encode_error,
    encode_message,
    parse_frame,
    text_frame,
)
from publisher.message import Message


def _p(obj: object) -> object:
    return parse_frame(orjson.dumps(obj))


@pytest.mark.parametrize(("frame", "expected"), [
    ({"type": "join_room", "data": "r1"}, JoinRoom("r1")),
    ({"type": "leave_room", "data": "r1", "id": 4}, LeaveRoom("r1", 4)),
    ({"type": "broadcast", "data": {"x": 1}}, Broadcast({"x": 1})),
    ({"type": "room_message", "data": {"room": "r", "message": "hi"}, "id": "a"},
     RoomMessage("r", "hi", "a")),
    ({"type": "private_message", "data": {"user_id": "u", "message": [1]}},
     PrivateMessage("u", [1])),
    ({"type": "ping", "data": 7, "id": 9}, Ping(7, 9)),
    ({"type": "ping"}, Ping(None)),
])
def test_valid_frames_parse_to_typed_frames(frame: dict[str, object], expected: object) -> None:
    """Each client type of docs/protocol.md parses to its dataclass."""
    assert _p(frame) == expected


@pytest.mark.parametrize(("text", "code"), [
    (b"not json", ErrorCode.BAD_JSON),
    (b"[1,2]", ErrorCode.BAD_JSON),
    (b'"str"', ErrorCode.BAD_JSON),
    (b"{}", ErrorCode.BAD_MESSAGE),
    (b'{"type": 5}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "x", "id": 1.5}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "x", "id": true}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "nope"}', ErrorCode.UNKNOWN_TYPE),
    (b'{"type": "join_room", "data": ""}', ErrorCode.BAD_ROOM),
    (b'{"type": "join_room", "data": 5}', ErrorCode.BAD_ROOM),
    (b'{"type": "join_room", "data": "a b"}', ErrorCode.BAD_ROOM),
    (b'{"type": "join_room", "data": "a{b"}', ErrorCode.BAD_ROOM),
    (b'{"type": "leave_room", "data": "x\\u0001"}', ErrorCode.BAD_ROOM),
    (b'{"type": "room_message", "data": "r"}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "room_message", "data": {"room": "r"}}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "room_message", "data": {"room": "", "message": 1}}', ErrorCode.BAD_ROOM),
    (b'{"type": "private_message", "data": {"message": 1}}', ErrorCode.BAD_MESSAGE),
    (b'{"type": "private_message", "data": {"user_id": "a b", "message": 1}}', ErrorCode.BAD_MESSAGE),
])
def test_invalid_frames_give_their_error_code(text: bytes, code: ErrorCode) -> None:
    """Every rejection is a ProtocolError value with the code of docs/protocol.md."""
    result = parse_frame(text)
    assert isinstance(result, ProtocolError)
    assert result.code is code


def test_error_keeps_frame_id() -> None:
    """An error for a frame with an id carries that id, so the client can correlate it."""
    result = parse_frame(b'{"type": "nope", "id": 12}')
    assert isinstance(result, ProtocolError) and result.id == 12


def test_room_name_length_limit() -> None:
    """Room names of 128 characters pass, 129 do not."""
    assert _p({"type": "join_room", "data": "r" * 128}) == JoinRoom("r" * 128)
    result = _p({"type": "join_room", "data": "r" * 129})
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.BAD_ROOM


def test_deep_nesting_and_huge_numbers_do_not_raise() -> None:
    """Hostile JSON yields an error value, never an exception."""
    assert isinstance(parse_frame(b"[" * 100000), ProtocolError)
    # readable (orjson reads 1024 levels) but not writable back (254): refused up front
    deep = b'{"type": "broadcast", "data": ' + b"[" * 300 + b"]" * 300 + b"}"
    result = parse_frame(deep)
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.BAD_MESSAGE
    assert isinstance(parse_frame(b'{"type": "ping", "data": 1' + b"0" * 400 + b"}"), ProtocolError)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_header_lengths(size: int) -> None:
    """Server frames use the 7-bit, 16-bit and 64-bit length forms of RFC 6455."""
    frame = text_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == size + 2
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size


def test_encoders_produce_protocol_shapes() -> None:
    """ack, error and messages have exactly the documented fields."""
    assert orjson.loads(encode_ack(3).payload) == {"type": "ack", "id": 3}
    assert orjson.loads(encode_error(ErrorCode.BAD_ROOM, "m", "x").payload) == {
        "type": "error", "data": {"code": "bad_room", "message": "m"}, "id": "x"}
    assert orjson.loads(encode_error(ErrorCode.BAD_JSON, "m").payload) == {
        "type": "error", "data": {"code": "bad_json", "message": "m"}}
    wire = orjson.loads(encode_message(Message("t", 1, timestamp=5)).payload)
    assert wire == {"type": "t", "data": 1, "timestamp": 5}


def test_close_codes_match_protocol() -> None:
    """Close codes are the numbers of docs/protocol.md."""
    assert [c.value for c in CloseCode] == [1000, 1001, 1003, 1008, 1009, 1013, 4000, 4001]  # 4000/4001: control
