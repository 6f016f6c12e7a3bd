"""Server frames built once per message per node, in every wire form a socket may need.

Pure: no I/O. A `Frame` holds the JSON payload of one server message; the
complete WebSocket frame for each form (JSON text or msgpack binary, plain or
permessage-deflate) is built the first time a socket of that form asks for it
and then shared by every socket of the node (docs/protocol.md). The
deflate forms are compressible once for all because the node always
negotiates `server_no_context_takeover`: no socket's compressor carries state
from one message to the next.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import orjson

__all__ = [
    "BINARY", "DEFLATE", "JSON", "MSGPACK", "Frame", "close_frame", "compress", "data_frame",
    "text_frame",
]

# Wire forms: a bit set. A connection's form is fixed by its handshake.
JSON = 0
DEFLATE = 1
MSGPACK = 2
BINARY = MSGPACK  # the msgpack forms are binary frames

_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_CLOSE = struct.Struct("!H").pack
_TAIL = b"\x00\x00\xff\xff"


def data_frame(first: int, payload: bytes) -> bytes:
    """A complete unmasked final frame; `first` is the FIN/RSV1/opcode byte."""
    n = len(payload)
    if n < 126:
        return _LEN1(first, n) + payload
    if n < 65536:
        return _LEN2(first, 126, n) + payload
    return _LEN3(first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, final WebSocket text frame carrying `payload`."""
    return data_frame(0x81, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125 bytes a control frame may carry."""
    return data_frame(0x88, _CLOSE(code) + reason.encode()[:123].decode(errors="ignore").encode())


def compress(payload: bytes) -> bytes:
    """One message's deflate payload, with no context kept (RFC 7692 section 7.2.1)."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(_TAIL) else out


class Frame:
    """One server message, ready for any socket: `wire(form, …)` is its complete frame for that form."""

    __slots__ = ("payload", "text", "_forms")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.text = text_frame(payload)
        self._forms: list[bytes | None] | None = None

    @classmethod
    def of(cls, value: Any) -> Frame:
        return cls(orjson.dumps(value))

    def wire(self, form: int, min_compress: int = 0) -> bytes:
        """`min_compress` is the node's `--compress-min-bytes`: a smaller payload goes
        uncompressed even to a socket that negotiated deflate (compressing it costs
        more CPU than the bytes it saves)."""
        if form & DEFLATE and len(self.payload) < min_compress:
            form ^= DEFLATE
        if form == JSON:
            return self.text
        forms = self._forms
        if forms is None:
            forms = self._forms = [self.text, None, None, None]
        out = forms[form]
        if out is None:
            out = forms[form] = self._build(form)
        return out

    def value(self) -> Any:
        return orjson.loads(self.payload)

    def _build(self, form: int) -> bytes:
        if form & MSGPACK:
            body = msgpack.packb(self.value())
            opcode = 0x82
        else:
            body, opcode = self.payload, 0x81
        if form & DEFLATE:
            return data_frame(opcode | 0x40, compress(body))
        return data_frame(opcode, body)
