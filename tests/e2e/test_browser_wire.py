"""permessage-deflate as a browser negotiates it (docs/protocol.md), in a real Chromium.

Chromium offers permessage-deflate on every WebSocket; the node accepts it, so
every browser test already runs compressed. This one checks the negotiation
itself (`WebSocket.extensions`) and that big messages, compressed by the node
and by the browser, arrive intact both ways, for a bare WebSocket and for hub.js.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer

from tests.e2e import test_browser
from tests.e2e.test_browser import Opener, client_page, results

_browser_available = test_browser._browser_available
browser = test_browser.browser
open_page = test_browser.open_page

BIG = 3000  # characters: over --compress-min-bytes, so the node compresses

PAGE = """
(async () => {
  const text = "chromium-".repeat(%(n)d).slice(0, %(n)d);
  const r = {};
  const ws = new WebSocket(location.origin.replace("http", "ws") + "/ws?user_id=raw");
  const frames = [];
  const next = (type) => new Promise((resolve) => {
    const look = () => {
      const i = frames.findIndex((f) => f.type === type);
      if (i >= 0) resolve(frames.splice(i, 1)[0]); else setTimeout(look, 10);
    };
    look();
  });
  ws.onmessage = (ev) => frames.push(JSON.parse(ev.data));
  await new Promise((resolve) => { ws.onopen = resolve; });
  r.extensions = ws.extensions;
  r.connected = (await next("connected")).type;
  ws.send(JSON.stringify({ type: "join_room", data: "wire", id: 1 }));
  r.ack = (await next("ack")).id;
  ws.send(JSON.stringify({ type: "room_message", data: { room: "wire", message: text } }));
  r.rawEcho = (await next("room_message")).data.message === text;
  const hub = new HubClient("/ws", { userId: "hubjs" });
  const echo = new Promise((resolve) => hub.on("room_message", resolve));
  await hub.join("wire");
  await hub.sendToRoom("wire", text + "!");
  r.hubEcho = (await echo).data.message === text + "!";
  r.rawSawHub = (await next("room_message")).data.message === text + "!";
  hub.close();
  ws.close();
  window.results = r;
})();
"""


async def test_browser_negotiates_deflate_and_big_messages_cross_both_ways(hub: TestServer,
                                                                          open_page: Opener) -> None:
    page = await open_page(str(hub.make_url("/healthz")), client_page(PAGE % {"n": BIG}, module=False))
    got: dict[str, Any] = await results(page)
    assert got["extensions"] == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    assert got == {**got, "connected": "connected", "ack": 1, "rawEcho": True, "hubEcho": True, "rawSawHub": True}
