"""The lean socket's pure parts: frame reader, handshake negotiation, frames in every wire form."""

from __future__ import annotations

import os
import struct
import zlib

import msgpack
import orjson
import pytest

from hubnode.frames import DEFLATE, JSON, MSGPACK, Frame, close_frame, compress
from hubnode.handshake import DEFLATE_RESPONSE, MSGPACK_PROTOCOL, accept_key, negotiate, parse_deflate_offers
from hubnode.protocol import JoinRoom, ProtocolError, parse_packed
from hubnode.wsreader import BINARY, CLOSE, PING, PONG, TEXT, FrameReader, Violation, unmask


def client_frame(payload: bytes, op: int = TEXT, fin: bool = True, rsv1: bool = False,
                 masked: bool = True) -> bytes:
    """A frame as a client sends it: masked with a random key."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | op
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + unmask(key, payload)


def deflated(payload: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


# -- reader ------------------------------------------------------------------
def test_reads_text_binary_and_control_frames() -> None:
    r = FrameReader(1000)
    data = (client_frame(b'{"a":1}') + client_frame(b"\x01\x02", BINARY) + client_frame(b"hi", PING)
            + client_frame(b"", PONG))
    assert r.feed(data) == [(TEXT, '{"a":1}'), (BINARY, b"\x01\x02"), (PING, b"hi"), (PONG, b"")]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_every_length_encoding_and_any_split(size: int) -> None:
    """A frame split at every kind of boundary is read whole, exactly once."""
    payload = bytes(i % 251 for i in range(size))
    data = client_frame(payload, BINARY) * 2
    for cut in (1, 2, 3, 5, 9, 14, len(data) // 2, len(data) - 1):
        r = FrameReader(0)
        got = r.feed(data[:cut]) + r.feed(data[cut:])
        assert got == [(BINARY, payload), (BINARY, payload)]


def test_byte_by_byte() -> None:
    r = FrameReader(0)
    data = client_frame(b"x" * 300) + client_frame(b"ping", PING)
    got = []
    for i in range(len(data)):
        got += r.feed(data[i:i + 1])
    assert got == [(TEXT, "x" * 300), (PING, b"ping")]


def test_fragments_with_a_control_frame_between() -> None:
    r = FrameReader(100)
    data = (client_frame(b"he", TEXT, fin=False) + client_frame(b"p", PING)
            + client_frame(b"ll", 0, fin=False) + client_frame(b"o", 0))
    assert r.feed(data) == [(PING, b"p"), (TEXT, "hello")]


@pytest.mark.parametrize(("data", "code"), [
    (client_frame(b"x", masked=False), 1002),  # unmasked
    (client_frame(b"x", 0x3), 1002),  # reserved opcode
    (client_frame(b"x", 0xB), 1002),  # reserved control opcode
    (client_frame(b"x", rsv1=True), 1002),  # RSV1 without deflate
    (client_frame(b"x", PING, fin=False), 1002),  # fragmented control frame
    (client_frame(b"x" * 126, PING), 1002),  # control frame over 125 bytes
    (client_frame(b"x", 0), 1002),  # continuation of nothing
    (client_frame(b"a", TEXT, fin=False) + client_frame(b"b", TEXT), 1002),  # new message mid-fragments
    (client_frame(b"\xff\xfe"), 1007),  # invalid UTF-8
    (client_frame(b"x" * 101), 1009),  # over the limit
    (client_frame(b"x" * 60, fin=False) + client_frame(b"x" * 60, 0), 1009),  # over the limit in fragments
    (client_frame(b"\x03", CLOSE), 1002),  # 1-byte close payload
    (client_frame(struct.pack("!H", 1005), CLOSE), 1002),  # a code that may not be sent
    (client_frame(struct.pack("!H", 1000) + b"\xff", CLOSE), 1007),  # reason not UTF-8
])
def test_violations_carry_their_close_code(data: bytes, code: int) -> None:
    with pytest.raises(Violation) as caught:
        FrameReader(100).feed(data)
    assert caught.value.code == code


def test_the_limit_is_known_from_the_header_alone() -> None:
    """A frame announcing more than the limit is refused before its payload is buffered."""
    head = struct.pack("!BBQ", 0x81, 0x80 | 127, 10_000_000) + b"\x00\x00\x00\x00"
    with pytest.raises(Violation) as caught:
        FrameReader(65536).feed(head)
    assert caught.value.code == 1009


def test_nothing_after_a_close_frame_is_read() -> None:
    r = FrameReader(100)
    got = r.feed(client_frame(struct.pack("!H", 1000), CLOSE) + client_frame(b"late"))
    assert got == [(CLOSE, struct.pack("!H", 1000))]


def test_deflated_messages_inflate_without_context() -> None:
    r = FrameReader(10_000, deflate=True)
    body = b'{"type":"ping","data":"' + b"z" * 3000 + b'"}'
    first = client_frame(deflated(body), rsv1=True)
    # fragmented: RSV1 on the first frame only
    comp = deflated(body)
    frag = client_frame(comp[:10], TEXT, fin=False, rsv1=True) + client_frame(comp[10:], 0)
    assert r.feed(first + frag) == [(TEXT, body.decode()), (TEXT, body.decode())]


def test_a_deflate_bomb_is_refused_past_the_limit() -> None:
    r = FrameReader(10_000, deflate=True)
    with pytest.raises(Violation) as caught:
        r.feed(client_frame(deflated(b"a" * 1_000_000), rsv1=True))
    assert caught.value.code == 1009


def test_garbage_deflate_data_is_invalid() -> None:
    with pytest.raises(Violation) as caught:
        FrameReader(10_000, deflate=True).feed(client_frame(b"\xff\xff\xff\xff", rsv1=True))
    assert caught.value.code == 1007


# -- frames --------------------------------------------------------------------
def _payload(frame: bytes) -> tuple[int, bytes]:
    n, start = frame[1] & 0x7F, 2
    if n == 126:
        start = 4
    elif n == 127:
        start = 10
    return frame[0], frame[start:]


def test_every_form_carries_the_same_message() -> None:
    value = {"type": "room_message", "room": "r", "data": {"text": "y" * 2000}}
    frame = Frame.of(value)
    first, body = _payload(frame.wire(JSON))
    assert first == 0x81 and orjson.loads(body) == value
    first, body = _payload(frame.wire(MSGPACK))
    assert first == 0x82 and msgpack.unpackb(body) == value
    first, body = _payload(frame.wire(DEFLATE, 512))
    assert first == 0xC1 and orjson.loads(zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")) == value
    first, body = _payload(frame.wire(MSGPACK | DEFLATE, 512))
    assert first == 0xC2
    assert msgpack.unpackb(zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")) == value


def test_each_form_is_built_once_per_message() -> None:
    frame = Frame.of({"type": "t", "data": "x" * 1000})
    assert frame.wire(DEFLATE, 512) is frame.wire(DEFLATE, 512)
    assert frame.wire(MSGPACK, 512) is frame.wire(MSGPACK, 512)


def test_small_messages_go_uncompressed() -> None:
    frame = Frame.of({"type": "t", "data": "small"})
    assert frame.wire(DEFLATE, 512) is frame.text
    assert _payload(frame.wire(MSGPACK | DEFLATE, 512))[0] == 0x82
    assert _payload(frame.wire(DEFLATE, 0))[0] == 0xC1  # --compress-min-bytes 0: everything


def test_compress_keeps_no_context() -> None:
    """Two compressions of one payload are equal: nothing carries over between messages."""
    assert compress(b"abc" * 100) == compress(b"abc" * 100)


def test_close_frame_reason_fits_a_control_frame() -> None:
    frame = close_frame(4000, "é" * 200)
    assert frame[0] == 0x88 and frame[1] <= 125


# -- handshake ------------------------------------------------------------------
def _headers(**extra: str) -> dict[str, str]:
    base = {"Upgrade": "websocket", "Connection": "keep-alive, Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return base


def test_accept_key_of_rfc6455() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_plain_upgrade_is_json_uncompressed() -> None:
    got = negotiate(_headers(), True)
    assert not isinstance(got, str) and got.form == JSON
    assert got.response.startswith(b"HTTP/1.1 101 ") and got.response.endswith(b"\r\n\r\n")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in got.response and b"Extensions" not in got.response


def test_msgpack_and_deflate_are_negotiated() -> None:
    got = negotiate(_headers(**{"Sec-WebSocket-Protocol": f"chat, {MSGPACK_PROTOCOL}",
                                "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}), True)
    assert not isinstance(got, str) and got.form == MSGPACK | DEFLATE
    assert f"Sec-WebSocket-Protocol: {MSGPACK_PROTOCOL}".encode() in got.response
    assert f"Sec-WebSocket-Extensions: {DEFLATE_RESPONSE}".encode() in got.response


def test_no_compression_declines_deflate() -> None:
    got = negotiate(_headers(**{"Sec-WebSocket-Extensions": "permessage-deflate"}), False)
    assert not isinstance(got, str) and got.form == JSON and b"Extensions" not in got.response


@pytest.mark.parametrize(("offer", "accepted"), [
    ("permessage-deflate", True),
    ("permessage-deflate; client_max_window_bits", True),  # what browsers send
    ("permessage-deflate; client_max_window_bits=10; server_no_context_takeover", True),
    ("permessage-deflate; server_max_window_bits=10", False),  # the node compresses with a full window
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),  # the second offer
    ("permessage-deflate; bogus", False),
    ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", False),
    ("x-webkit-deflate-frame", False),
    ("", False),
])
def test_deflate_offers(offer: str, accepted: bool) -> None:
    assert parse_deflate_offers(offer) is accepted


@pytest.mark.parametrize("bad", [
    {"Upgrade": "h2c"}, {"Connection": "keep-alive"}, {"Sec-WebSocket-Version": "8"},
    {"Sec-WebSocket-Key": "short"}, {"Sec-WebSocket-Key": "not base64!!"},
])
def test_bad_upgrades_are_refused_with_a_reason(bad: dict[str, str]) -> None:
    got = negotiate({**_headers(), **bad}, True)
    assert isinstance(got, str) and got


# -- msgpack client frames --------------------------------------------------------------
def test_packed_frames_parse_like_json_ones() -> None:
    assert parse_packed(msgpack.packb({"type": "join_room", "data": "lobby", "id": 3})) == JoinRoom("lobby", 3)


@pytest.mark.parametrize(("data", "code"), [
    (b"\xc1", "bad_json"),  # never used byte
    (msgpack.packb([1, 2]), "bad_json"),
    (msgpack.packb({"type": "ping", "data": b"\x00"}), "bad_message"),  # bytes: JSON cannot carry them
    (msgpack.packb({"type": "ping", 1: 2}), "bad_message"),
])
def test_bad_packed_frames(data: bytes, code: str) -> None:
    got = parse_packed(data)
    assert isinstance(got, ProtocolError) and got.code.value == code


def test_a_violation_is_final_and_frees_the_buffer() -> None:
    """After a breach nothing more is read or kept, however much the client goes on sending."""
    r = FrameReader(100)
    frame = client_frame(b"x" * 90)
    assert r.feed(frame[:10]) == []  # a frame split across reads
    with pytest.raises(Violation):
        r.feed(frame[10:] + client_frame(b"x", 0x3))
    assert r.feed(b"\x00" * 100_000) == [] and r.feed(client_frame(b"ok")) == []
    assert r.failed and r._buf == b""


def test_empty_fragments_are_bounded() -> None:
    r = FrameReader(100)
    data = client_frame(b"", TEXT, fin=False) + client_frame(b"", 0, fin=False) * 1100
    with pytest.raises(Violation) as caught:
        r.feed(data)
    assert caught.value.code == 1009


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    frame = close_frame(1000, "é" * 100)
    assert frame[4:].decode() == "é" * 61
