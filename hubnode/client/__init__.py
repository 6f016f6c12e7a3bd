"""hubnode.client: an asyncio client for the hub, for bots, services, tests and load scripts.

    from hubnode.client import HubClient

    async with HubClient("ws://127.0.0.1:8080/ws", user_id="bot") as hub:
        await hub.join("lobby")                      # returns the ack; raises HubError
        await hub.send_to_room("lobby", "hello")
        async for msg in hub:                        # every message, and the client's events
            print(msg["type"], msg.get("data"))

It behaves as hub.js does in a page (docs/browser.md), so both sides of an
application see the same things:

- every request carries an id and returns the matching `ack` (or `pong`,
  `presence`) frame, or raises `RequestFailed` with the protocol's error code;
  `RequestTimeout` after `timeout` seconds. Requests made while disconnected
  wait for the next connection (within their timeout); one in flight when the
  connection drops raises `Disconnected`, except joins and leaves, which are
  sent again (they are idempotent);
- it reconnects with jittered exponential backoff, to the next URL of its
  list, at once (with a little jitter) when the node drains; it re-joins every
  room on every new connection, and recovers streams with history from the
  last position it delivered (`since` on joins and `?since=` on connect),
  dropping a replayed message's live copy by offset: a `recovered` event per
  stream says whether nothing was lost;
- close 4000 (a server-side disconnect) stops it for good, 4001 reconnects;
- with `presence=True` it keeps each joined room's member list (`members(room)`
  and `members` events);
- a frame that is not a hub frame (not JSON or msgpack, not a map with a
  string `type`) is a broken or foreign server: it raises `BadServerFrame`
  from `connect()` and from iteration, and the client stops.

Only aiohttp and msgpack are needed: `pip install 'hubnode[client]'`.
"""

from __future__ import annotations

from hubnode.client.errors import (
    BadServerFrame,
    ClientClosed,
    Disconnected,
    HandshakeRefused,
    HubError,
    LeftRoom,
    RequestFailed,
    RequestTimeout,
)
from hubnode.client.hub import HubClient
from hubnode.client.state import Position

__all__ = ["BadServerFrame", "ClientClosed", "Disconnected", "HandshakeRefused", "HubClient", "HubError",
           "LeftRoom", "Position", "RequestFailed", "RequestTimeout"]
