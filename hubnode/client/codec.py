"""Frames in and out of hubnode.client: JSON text or `hubnode.msgpack` binary, and what no hub sends.

Pure: no I/O. Encoding fails in the caller for a value the wire form cannot
carry (a set, NaN, a datetime for msgpack); decoding turns anything that is not
a map with a string `type`, in the connection's form, into BadServerFrame.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from hubnode.client.errors import BadServerFrame

__all__ = ["Frame", "data_of", "decode", "encode"]

Frame = dict[str, Any]


def encode(frame: Frame, packed: bool) -> bytes | str:
    if packed:
        return bytes(msgpack.packb(frame))
    return json.dumps(frame, separators=(",", ":"), allow_nan=False)


def decode(data: Any, binary: bool, packed: bool) -> Frame:
    """One server frame: `binary` says which kind of WebSocket frame carried `data`."""
    if not binary and not packed:
        try:
            frame = json.loads(data)
        except ValueError:
            raise BadServerFrame(f"the server sent a text frame that is not JSON: {data[:80]!r}") from None
    elif binary and packed:
        try:
            frame = msgpack.unpackb(data, raw=False)
        except Exception:  # msgpack raises several types for malformed input
            raise BadServerFrame(f"the server sent a binary frame that is not msgpack: {data[:80]!r}") from None
    else:
        form = "msgpack (binary)" if packed else "JSON (text)"
        raise BadServerFrame(f"the server sent a {'binary' if binary else 'text'} frame on a {form} connection")
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise BadServerFrame(f"the server sent a frame that is not a map with a string 'type': {frame!r:.80}")
    return frame


def data_of(frame: Frame) -> dict[str, Any]:
    """A frame's `data` when it is a map, else an empty one."""
    data = frame.get("data")
    return data if isinstance(data, dict) else {}
