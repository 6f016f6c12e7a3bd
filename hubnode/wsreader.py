"""Incremental reader of client WebSocket frames (RFC 6455, RFC 7692).

Pure: no I/O. `FrameReader.feed` takes the bytes `data_received` got and
returns the complete messages and control frames in them; a breach of the
protocol raises `Violation` with the close code to send. The reader keeps no
buffer between calls unless a frame is split across reads, so an idle
connection costs a few slots, not a buffer (the point of the lean socket).
"""

from __future__ import annotations

import zlib

__all__ = ["CLOSE", "PING", "PONG", "TEXT", "BINARY", "FrameReader", "Violation", "unmask"]

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA

# WebSocket-level close codes (the hub's own are in hubnode.errors.CloseCode)
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

_TAIL = b"\x00\x00\xff\xff"
MAX_FRAGMENTS = 1024  # empty fragments cost no bytes, so the size limit alone does not bound them

try:  # aiohttp's compiled XOR; the same result as the fallback below, faster
    from aiohttp._websocket.mask import (
        _websocket_mask_cython as _mask_in_place,  # type: ignore[import-not-found,unused-ignore]
    )
except ImportError:  # pragma: no cover - aiohttp without its C extensions
    _mask_in_place = None


def unmask(mask: bytes, payload: bytes | bytearray) -> bytes:
    """XOR the payload with the 4-byte mask."""
    if not payload:
        return b""
    if _mask_in_place is not None:
        out = bytearray(payload)
        _mask_in_place(mask, out)
        return bytes(out)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class Violation(Exception):
    """The client broke the WebSocket protocol: close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Message = tuple[int, str | bytes]


class FrameReader:
    """Frames in, messages out: (TEXT, str), (BINARY, bytes), (CLOSE|PING|PONG, bytes)."""

    __slots__ = ("_buf", "_max", "_deflate", "_frag_op", "_frag", "_frag_deflated", "_frags", "failed")

    def __init__(self, max_size: int, deflate: bool = False) -> None:
        self._buf: bytes = b""
        self._max = max_size  # 0: no limit
        self._deflate = deflate
        self._frag_op = 0  # opcode of the fragmented message being read, 0 if none
        self._frag: bytearray | None = None
        self._frag_deflated = False
        self._frags = 0
        self.failed = False  # after a Violation nothing more is read (RFC 6455 section 7.1.7)

    def feed(self, data: bytes) -> list[Message]:
        if self.failed:
            return []
        try:
            return self._feed(data)
        except Violation:
            self.failed = True
            self._buf, self._frag = b"", None
            raise

    def _feed(self, data: bytes) -> list[Message]:
        buf = self._buf + data if self._buf else data
        out: list[Message] = []
        pos, n = 0, len(buf)
        limit = self._max
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            size, head = b1 & 0x7F, 2
            if size == 126:
                if n - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif size == 127:
                if n - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                if size >> 63:
                    raise Violation(PROTOCOL_ERROR, "frame length out of range")
            op = b0 & 0x0F
            self._check(b0, b1, op, size)
            if limit and op < 8 and size + (len(self._frag) if self._frag else 0) > limit:
                raise Violation(TOO_BIG, f"message over {limit} bytes")
            end = pos + head + 4 + size
            if end > n:
                break
            mask = bytes(buf[pos + head:pos + head + 4])
            payload = unmask(mask, buf[pos + head + 4:end])
            pos = end
            message = self._message(b0, op, payload)
            if message is not None:
                out.append(message)
                if message[0] == CLOSE:
                    pos = n  # nothing after a close frame is read
        self._buf = bytes(buf[pos:]) if pos < n else b""
        return out

    def _check(self, b0: int, b1: int, op: int, size: int) -> None:
        if not b1 & 0x80:
            raise Violation(PROTOCOL_ERROR, "client frames must be masked")
        if b0 & 0x30 or (b0 & 0x40 and (op >= 8 or op == 0 or not self._deflate)):
            raise Violation(PROTOCOL_ERROR, "reserved bits set")
        if op >= 8:
            if op not in (CLOSE, PING, PONG):
                raise Violation(PROTOCOL_ERROR, f"unknown opcode {op}")
            if not b0 & 0x80 or size > 125:
                raise Violation(PROTOCOL_ERROR, "control frames must be final and at most 125 bytes")
        elif op not in (0, TEXT, BINARY):
            raise Violation(PROTOCOL_ERROR, f"unknown opcode {op}")
        elif op == 0 and not self._frag_op:
            raise Violation(PROTOCOL_ERROR, "continuation frame with no message to continue")
        elif op != 0 and self._frag_op:
            raise Violation(PROTOCOL_ERROR, "new message before the fragmented one ended")

    def _message(self, b0: int, op: int, payload: bytes) -> Message | None:
        if op >= 8:
            if op == CLOSE:
                _check_close(payload)
            return (op, payload)
        fin = b0 & 0x80
        if op:  # the first frame of a message
            if fin:
                return self._complete(op, payload, bool(b0 & 0x40))
            self._frag_op, self._frag, self._frag_deflated = op, bytearray(payload), bool(b0 & 0x40)
            self._frags = 1
            return None
        assert self._frag is not None
        self._frags += 1
        if self._frags > MAX_FRAGMENTS:
            raise Violation(TOO_BIG, f"message in over {MAX_FRAGMENTS} fragments")
        self._frag += payload
        if not fin:
            return None
        whole, op, deflated = bytes(self._frag), self._frag_op, self._frag_deflated
        self._frag_op, self._frag = 0, None
        return self._complete(op, whole, deflated)

    def _complete(self, op: int, payload: bytes, deflated: bool) -> Message:
        if deflated:
            payload = self._inflate(payload)
        if op == BINARY:
            return (op, payload)
        try:
            return (op, payload.decode())
        except UnicodeDecodeError:
            raise Violation(INVALID_DATA, "text frame is not valid UTF-8") from None

    def _inflate(self, payload: bytes) -> bytes:
        """One message, no context kept: the node negotiates client_no_context_takeover."""
        limit = self._max
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(payload + _TAIL, limit + 1 if limit else 0)
        except zlib.error:
            raise Violation(INVALID_DATA, "compressed message does not inflate") from None
        if limit and (len(out) > limit or d.unconsumed_tail):
            raise Violation(TOO_BIG, f"message over {limit} bytes once inflated")
        return out


def _check_close(payload: bytes) -> None:
    if len(payload) == 1:
        raise Violation(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    if len(payload) >= 2:
        code = int.from_bytes(payload[:2], "big")
        if code < 1000 or 1004 <= code <= 1006 or 1015 <= code < 3000 or code >= 5000:
            raise Violation(PROTOCOL_ERROR, f"close code {code} may not be sent")
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise Violation(INVALID_DATA, "close reason is not valid UTF-8") from None
