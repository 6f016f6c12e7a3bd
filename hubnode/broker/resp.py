"""A minimal Redis subscriber connection: RESP over an asyncio Protocol, parsed by hiredis.

Why not redis-py's PubSub: the node must (1) know exactly when Redis confirmed
each SUBSCRIBE, (2) drain the socket the moment bytes arrive, whatever the
rest of the loop is doing, so Redis never cuts us for a full output buffer,
and (3) own reconnection, to resubscribe and announce `resync` itself.
`data_received` gives all three in a few lines; hiredis does the parsing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis

from publisher.topology import Address, Target

__all__ = ["SubscriberConnection", "connect_subscriber", "encode_command"]


def encode_command(*args: str | bytes) -> bytes:
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class SubscriberConnection(asyncio.Protocol):
    """One subscriber socket; pushes go to `on_push`, the loss to `on_lost`."""

    def __init__(self, on_push: Callable[[Any], None], on_lost: Callable[[Exception | None], None]) -> None:
        self._reader = hiredis.Reader()
        self._on_push = on_push
        self._on_lost = on_lost
        self._replies: list[asyncio.Future[Any]] = []  # answers expected before subscribe mode
        self._outbox: list[bytes] = []  # commands of this loop iteration, written together
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if self._replies:
                future = self._replies.pop(0)
                if not future.done():
                    future.set_result(reply)
            else:
                self._on_push(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self._replies:
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))
        self._replies.clear()
        self._on_lost(exc)

    def send(self, *args: str | bytes) -> None:
        """Queue a command; the commands of one loop iteration leave in one write.

        A connect storm subscribes thousands of user channels, one SUBSCRIBE per
        handshake: one system call for each of them was a visible part of the node's CPU.
        """
        if self.transport is None or self.transport.is_closing():
            return
        self._outbox.append(encode_command(*args))
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    async def call(self, *args: str | bytes) -> Any:
        """Send a command and await its reply (only before the first SUBSCRIBE)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(future)
        self.send(*args)
        return await future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect_subscriber(target: Target, address: Address | None, on_push: Callable[[Any], None],
                             on_lost: Callable[[Exception | None], None],
                             timeout: float, name: str = "") -> SubscriberConnection:
    """Open and authenticate a subscriber connection to `address` (None: the Target's unix socket).

    TLS, when the Target says so, uses the Target's CA and client
    certificate, like every other connection to this Redis. `name` is set
    with CLIENT SETNAME, so an operator sees in CLIENT LIST which node holds
    which connection.
    """
    loop = asyncio.get_running_loop()
    context = target.ssl_context()

    def factory() -> SubscriberConnection:
        return SubscriberConnection(on_push, on_lost)

    if address is None:
        coro = loop.create_unix_connection(factory, target.unix_path)
    else:
        coro = loop.create_connection(factory, address[0], address[1], ssl=context,
                                      server_hostname=address[0] if context is not None else None)
    async with asyncio.timeout(timeout):
        _transport, conn = await coro
    try:
        if target.password is not None:
            auth = [target.username] if target.username else []
            async with asyncio.timeout(timeout):
                reply = await conn.call("AUTH", *auth, target.password)
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"Redis AUTH failed: {reply}")
        if name:
            async with asyncio.timeout(timeout):
                await conn.call("CLIENT", "SETNAME", name)  # an error reply (CLIENT disabled) is harmless
    except BaseException:
        conn.close()
        raise
    return conn
