"""The WebSocket opening handshake: checks, subprotocol and permessage-deflate negotiation.

Pure: no I/O. `negotiate` reads the upgrade request's headers and returns the
exact `101` response bytes and the connection's wire form, or the reason for
a `400` (docs/protocol.md). The node writes the response itself
and takes the socket over from aiohttp (see hubnode.ws).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from hubnode.frames import DEFLATE, JSON, MSGPACK
from hubnode.wire import MSGPACK_PROTOCOL

__all__ = ["MSGPACK_PROTOCOL", "Accepted", "accept_key", "negotiate", "parse_deflate_offers"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Always both: no compressor or decompressor state outlives a message, so a
# node compresses each message once for all its sockets and keeps no zlib
# state per socket.
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
_DEFLATE_PARAMS = {"server_no_context_takeover", "client_no_context_takeover",
                   "client_max_window_bits", "server_max_window_bits"}


@dataclass(frozen=True, slots=True)
class Accepted:
    response: bytes
    form: int  # hubnode.frames JSON or MSGPACK, | DEFLATE


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def parse_deflate_offers(value: str) -> bool:
    """Whether one of the client's permessage-deflate offers can be accepted as the node answers them.

    An offer is declined when it has an unknown or repeated parameter, or asks
    the server for a window below 15 bits (the node compresses with a full
    window, once for every socket).
    """
    for offer in value.split(","):
        parts = [p.strip() for p in offer.split(";")]
        if parts[0].lower() != "permessage-deflate":
            continue
        seen: set[str] = set()
        ok = True
        for param in parts[1:]:
            if not param:
                continue
            name, _, arg = param.partition("=")
            name, arg = name.strip().lower(), arg.strip().strip('"')
            if name not in _DEFLATE_PARAMS or name in seen:
                ok = False
                break
            seen.add(name)
            if name == "server_max_window_bits" and arg != "15":
                ok = False
                break
            if name == "client_max_window_bits" and arg and not (arg.isdigit() and 8 <= int(arg) <= 15):
                ok = False
                break
            if name.endswith("no_context_takeover") and arg:
                ok = False
                break
        if ok:
            return True
    return False


def negotiate(headers: Mapping[str, str], compression: bool) -> Accepted | str:
    """The 101 response and wire form for this upgrade request, or why it is refused."""
    # exactly `websocket`: aiohttp's parser treats only that as an upgrade (and keeps the bytes after it)
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        return "not a WebSocket upgrade: 'Upgrade: websocket' is required"
    if headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in headers:
        return "an upgrade request has no body"
    if "upgrade" not in _tokens(headers.get("Connection", "")):
        return "not a WebSocket upgrade: 'Connection: upgrade' is required"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return "unsupported WebSocket version: 13 is required"
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return "bad Sec-WebSocket-Key"
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    form = JSON
    offered = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if MSGPACK_PROTOCOL in offered:
        form = MSGPACK
        lines.append(f"Sec-WebSocket-Protocol: {MSGPACK_PROTOCOL}")
    if compression and parse_deflate_offers(headers.get("Sec-WebSocket-Extensions", "")):
        form |= DEFLATE
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_RESPONSE}")
    return Accepted(("\r\n".join(lines) + "\r\n\r\n").encode(), form)
