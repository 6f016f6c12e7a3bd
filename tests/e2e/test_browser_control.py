"""Presence and server-side control (docs/protocol.md) in a real Chromium.

Two real node processes (a and b) share the session's redis-server, with
presence events in every room, history on and at most two rooms per
connection. The pages run hub.js (or the demo chat); the operator's side is
the HTTP API, called by the test or by the demo's kick button. "No reconnect"
is measured, not slept on: the page counts the WebSockets it opens, and the
test checks for a deadline well past the client's backoff that the count and
the node's client count stay put. Every other wait is a Playwright waiting
assertion, `wait_for_function` or `wait_until`, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.e2e import test_browser
from tests.e2e.test_browser import TIMEOUT_MS, Opener, client_page, demo_url, joined, shot
from tests.helpers import Client, NodeProcess, RedisServer, deadline, start_all, wait_until

try:
    from playwright.async_api import Page, expect
except ImportError:  # pragma: no cover - test_browser.py reports it through _browser_available
    pass

# test_browser.py's fixtures: Chromium (skipped or failed as there when it is missing) and its pages.
_browser_available = test_browser._browser_available
browser = test_browser.browser
open_page = test_browser.open_page

MAX_ROOMS = 2
# The page's backoff: a reconnect, if one were coming, would start within MAX_DELAY ms.
MIN_DELAY, MAX_DELAY = 50, 200
QUIET = 1.5  # seconds (scaled) without a reconnect that prove there is none: 7 times MAX_DELAY


@pytest.fixture
def nodes(redis_server: RedisServer, prefix: str) -> Iterator[dict[str, NodeProcess]]:
    """Nodes a and b, each a real process, on one Redis: presence events everywhere, history, 2 rooms per connection."""
    started = {name: NodeProcess("--redis-url", redis_server.url, "--node-id", name, "--key-prefix", prefix,
                                 "--rate", "0", "--presence-rooms", "*", "--history-size", "100",
                                 "--max-rooms-per-conn", str(MAX_ROOMS)) for name in ("a", "b")}
    start_all(started.values())
    try:
        yield started
    finally:
        for node in started.values():
            node.stop()


# -- helpers ---------------------------------------------------------------------------

async def api(session: aiohttp.ClientSession, node: NodeProcess, method: str, path: str,
              body: dict[str, Any] | None = None, status: int = 200) -> Any:
    """Call the node's HTTP API (JSON body, if any), check the status, return the JSON answer."""
    async with session.request(method, f"{node.url}{path}", json=body) as resp:
        text = await resp.text()
        assert resp.status == status, (method, path, resp.status, text)
        return json.loads(text) if text else None


async def publish(session: aiohttp.ClientSession, node: NodeProcess, room: str, data: Any) -> None:
    """POST /broadcast a `news` message to `room`."""
    await api(session, node, "POST", "/broadcast", {"type": "news", "room": room, "data": data}, status=202)


async def clients(session: aiohttp.ClientSession, node: NodeProcess) -> int:
    """The cluster's client count, as GET /api/stats on `node` gives it."""
    return int((await api(session, node, "GET", "/api/stats"))["clients"])


def client_count(session: aiohttp.ClientSession, node: NodeProcess, count: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for wait_until and holds: the cluster counts `count` clients."""
    async def check() -> bool:
        return await clients(session, node) == count
    return check


async def holds(predicate: Callable[[], Awaitable[Any]], seconds: float, what: str) -> None:
    """Check `predicate` until a deadline `seconds` (scaled) away: fail the moment it is false."""
    end = deadline(seconds)
    while time.monotonic() < end:
        assert await predicate(), f"{what} stopped holding"
        await asyncio.sleep(0.05)  # the polling interval of a deadline-bound check


async def log_of(page: Page) -> list[str]:
    return list(await page.evaluate("log"))


async def logged(page: Page, entry: str) -> None:
    """Wait for the page script's `log` to hold `entry`."""
    await page.wait_for_function("(entry) => log.includes(entry)", arg=entry, timeout=TIMEOUT_MS)


# Counts the page's WebSocket handshakes: hub.js builds each with `new WebSocket(url)`.
COUNT_SOCKETS = """
window.opened = 0;
const RealWebSocket = WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(...args) { super(...args); window.opened++; }
};
"""

# A page whose hub.js logs what the control tests look at. `hold`: while it is a
# pending Promise, the next connection attempt waits for it (a token function
# that says "not yet"), so the test decides when the page reconnects.
CONTROLLED = COUNT_SOCKETS + """
window.log = [];
window.hold = null;
const token = async () => { if (window.hold) await window.hold; return null; };
window.hub = new HubClient(URLS, { userId: "USER", token, minDelay: MIN_DELAY, maxDelay: MAX_DELAY });
hub.on("connected", (m) => log.push("connected " + m.data.node));
hub.on("disconnect", (m) => log.push("disconnect " + m.data.reason + " " + m.data.reconnect));
hub.on("disconnected", (e) => {
  log.push("disconnected " + e.code + " " + e.reason + " " + (e.delay === null ? "stop" : "retry"));
});
hub.on("joined", (m) => log.push("joined " + m.data.room + " " + m.data.offset));
hub.on("left", (m) => log.push("left " + m.data.room));
hub.on("error", (m) => log.push("error " + m.data.code + " " + (m.data.room || m.room)));
hub.on("recovered", (e) => {
  if (e.stream === "room") log.push("recovered " + e.room + " " + e.recovered + " " + e.offset);
});
hub.on("news", (m) => log.push("news " + m.data + " " + m.offset));
"""


async def controlled_page(open_page: Opener, node: NodeProcess, user: str, join: str | None = None) -> Page:
    """A page running CONTROLLED as `user` on `node`, joined to `join` if given."""
    script = (CONTROLLED.replace("URLS", json.dumps([node.ws_url])).replace("USER", user)
              .replace("MIN_DELAY", str(MIN_DELAY)).replace("MAX_DELAY", str(MAX_DELAY)))
    if join:
        script += f'hub.join("{join}").then(() => log.push("joined by me"));\n'
    page = await open_page(f"{node.url}/healthz", client_page(script, False))
    if join:
        await logged(page, "joined by me")
    else:
        await page.wait_for_function("() => hub.connected", timeout=TIMEOUT_MS)
    return page


# -- close 4000 / 4001 -----------------------------------------------------------------------

async def test_hub_js_stops_after_close_4000(nodes: dict[str, NodeProcess], open_page: Opener,
                                            session: aiohttp.ClientSession) -> None:
    """A server-side disconnect without reconnect: `disconnect` first, then close 4000, and hub.js stays away."""
    a = nodes["a"]
    page = await controlled_page(open_page, a, "kim", join="c")
    await wait_until(client_count(session, a, 1), 5, what="node a to count the page")
    answer = await api(session, a, "POST", "/api/users/kim/disconnect", {"reason": "bye", "reconnect": False})
    assert answer == {"ok": True, "nodes": 1}
    await page.wait_for_function("() => log.some((e) => e.startsWith('disconnected '))", timeout=TIMEOUT_MS)
    assert await log_of(page) == ["connected a", "joined by me", "disconnect bye false", "disconnected 4000 bye stop"]
    assert await page.evaluate("hub.connected") is False
    assert await page.evaluate("hub.join('d').catch((err) => err.code)") == "closed"  # the client is done
    await wait_until(client_count(session, a, 0), 5, what="node a to count no client")
    gone = client_count(session, a, 0)

    async def still_away() -> bool:
        state = await page.evaluate("({ opened: window.opened, connected: hub.connected, log: log.length })")
        return state == {"opened": 1, "connected": False, "log": 4} and await gone()

    await holds(still_away, QUIET, "no reconnect after close 4000")


async def test_hub_js_reconnects_after_close_4001(nodes: dict[str, NodeProcess], open_page: Opener,
                                                 session: aiohttp.ClientSession) -> None:
    """A disconnect of one connection id with reconnect true: close 4001, then hub.js reconnects and re-joins."""
    a = nodes["a"]
    page = await controlled_page(open_page, a, "ken", join="c")
    first = await page.evaluate("hub.info.conn_id")
    answer = await api(session, a, "POST", f"/api/connections/{first}/disconnect",
                       {"reason": "rebalance", "reconnect": True})
    assert answer == {"ok": True, "nodes": 1}
    await page.wait_for_function("() => log.filter((e) => e === 'connected a').length === 2", timeout=TIMEOUT_MS)
    await logged(page, "recovered c true 0")  # the room was re-joined on the new connection
    assert (await log_of(page))[:5] == ["connected a", "joined by me", "disconnect rebalance true",
                                        "disconnected 4001 rebalance retry", "connected a"]
    assert await page.evaluate("window.opened") == 2
    second = await page.evaluate("hub.info.conn_id")
    assert second != first
    room = await api(session, a, "GET", "/api/rooms/c")
    assert [(m["conn_id"], m["user_id"]) for m in room["members"]] == [(second, "ken")]


# -- server-side join and leave ---------------------------------------------------------------

async def test_hub_js_keeps_a_server_side_room_across_a_reconnect(nodes: dict[str, NodeProcess], open_page: Opener,
                                                                 session: aiohttp.ClientSession) -> None:
    """A room the server joined the page to is re-joined after a reconnect, from its position: nothing is lost.

    The page is joined by PUT, gets "one", is disconnected (4001) and held
    away while "two" is published, then reconnects: "two" is replayed and
    "three" arrives live, each once.
    """
    a, b = nodes["a"], nodes["b"]
    page = await controlled_page(open_page, a, "sam")
    assert await api(session, b, "PUT", "/api/users/sam/rooms/srv") == {"ok": True, "nodes": 1}
    await logged(page, "joined srv 0")
    assert await page.evaluate("[...hub.rooms]") == ["srv"]
    epoch = (await page.evaluate("hub.position('srv')"))["epoch"]
    await publish(session, b, "srv", "one")
    await logged(page, "news one 1")

    await page.evaluate("() => { window.hold = new Promise((resolve) => { window.release = resolve; }); }")
    await api(session, b, "POST", "/api/users/sam/disconnect", {"reason": "moving", "reconnect": True})
    await logged(page, "disconnected 4001 moving retry")
    await publish(session, b, "srv", "two")  # the page has no connection: only recovery can bring it
    await page.evaluate("release()")
    await logged(page, "recovered srv true 2")
    await publish(session, b, "srv", "three")
    await logged(page, "news three 3")
    assert await log_of(page) == [
        "connected a", "joined srv 0", "news one 1", "disconnect moving true", "disconnected 4001 moving retry",
        "connected a", "news two 2", "recovered srv true 2", "news three 3"]
    assert await page.evaluate("hub.position('srv')") == {"offset": 3, "epoch": epoch}
    room = await api(session, a, "GET", "/api/rooms/srv")
    assert [m["conn_id"] for m in room["members"]] == [await page.evaluate("hub.info.conn_id")]


async def test_hub_js_follows_server_side_leaves_and_refused_joins(nodes: dict[str, NodeProcess], open_page: Opener,
                                                                  session: aiohttp.ClientSession) -> None:
    """`left` drops a room from hub.js's set; a server-side join over --max-rooms-per-conn is an `error` event."""
    a = nodes["a"]
    page = await controlled_page(open_page, a, "lee", join="own")
    await api(session, a, "PUT", "/api/users/lee/rooms/extra")
    await logged(page, "joined extra 0")
    await api(session, a, "PUT", "/api/users/lee/rooms/third")  # a third room: over the limit of 2
    await logged(page, "error too_many_rooms third")
    assert sorted(await page.evaluate("[...hub.rooms]")) == ["extra", "own"]
    await api(session, a, "DELETE", "/api/users/lee/rooms/extra")
    await logged(page, "left extra")
    assert await page.evaluate("[...hub.rooms]") == ["own"]
    assert await page.evaluate("hub.position('extra')") is None
    assert (await api(session, a, "GET", "/api/rooms/extra"))["members"] == []


# -- presence -------------------------------------------------------------------------------

PRESENCE = """
window.log = [];
window.hub = new HubClient(URLS, { userId: "pat", presence: true });
hub.on("presence", (m) => log.push("presence " + m.room + " " + m.data.event + " " + m.data.user_id));
hub.on("members", (e) => log.push("members " + Object.keys(e.users).sort().join(",")));
hub.join("p").then(() => log.push("joined by me"));
"""


async def test_hub_js_presence_query_and_events(nodes: dict[str, NodeProcess], open_page: Opener,
                                               session: aiohttp.ClientSession) -> None:
    """presence(room) answers users and anonymous connections cluster-wide; join/leave events keep members(room)."""
    a, b = nodes["a"], nodes["b"]
    page = await open_page(f"{a.url}/healthz", client_page(PRESENCE.replace("URLS", json.dumps([a.ws_url])), False))
    await logged(page, "members pat")  # the answer to hub.js's own query after the join
    bob = await Client.open(session, f"{b.ws_url}?user_id=bob")
    ghost = await Client.open(session, b.ws_url)  # anonymous: counted, never announced
    try:
        await bob.join("p")
        await ghost.join("p")
        await logged(page, "presence p join bob")
        await logged(page, "members bob,pat")
        answer = await page.evaluate("hub.presence('p')")
        assert answer == {"users": {"pat": 1, "bob": 1}, "anonymous": 1}
        assert await page.evaluate("hub.presence('elsewhere').catch((err) => err.code)") == "not_in_room"
        await bob.close()
        await logged(page, "presence p leave bob")
        assert (await page.evaluate("hub.members('p')"))["users"] == {"pat": 1}
        assert "presence p join ghost" not in await log_of(page)
    finally:
        await bob.close()
        await ghost.close()


async def test_demo_member_list_follows_presence_and_kicks(nodes: dict[str, NodeProcess], open_page: Opener) -> None:
    """The demo's member list shows users joining and leaving on another node (events, no polling); kick removes one.

    alice's list is answered before anyone else is there, so bob and carol
    can only appear through presence events; carol closes her page, and
    alice kicks bob, whose page stops with close 4000.
    """
    a, b = nodes["a"], nodes["b"]
    alice = await open_page(demo_url(a, name="alice", room="pres"))
    await joined(alice, "pres")
    await expect(alice.locator("#members li")).to_have_count(1)
    await expect(alice.locator("#members li[data-user=alice]")).to_contain_text("node a")
    bob = await open_page(demo_url(b, name="bob", room="pres"))
    await joined(bob, "pres")
    await expect(alice.locator("#members li[data-user=bob]")).to_be_visible()
    await expect(alice.locator(".msg.system", has_text="bob entered the room")).to_have_count(1)
    carol = await open_page(demo_url(b, name="carol", room="pres"))
    await joined(carol, "pres")
    await expect(alice.locator("#members li[data-user=carol]")).to_be_visible()
    await expect(alice.locator("#members-note")).to_have_text("3 users")
    await expect(bob.locator("#members li")).to_have_count(3)  # bob's own query came after alice's join

    await carol.close()  # her only connection goes: she leaves the room
    await expect(alice.locator("#members li[data-user=carol]")).to_have_count(0)
    await expect(alice.locator(".msg.system", has_text="carol left the room")).to_have_count(1)
    await shot(alice, "demo-presence")

    await alice.click("#members li[data-user=bob] .kick")
    await expect(bob.locator(".msg.system", has_text="the server disconnected you: kicked by alice")).to_be_visible()
    await expect(bob.locator("#status")).to_have_text("disconnected")
    await expect(bob.locator(".msg.system", has_text="code 4000")).to_be_visible()
    await expect(alice.locator("#members li[data-user=bob]")).to_have_count(0)
    await expect(alice.locator(".msg.system", has_text="kicked bob")).to_be_visible()
    await expect(alice.locator("#members-note")).to_have_text("1 user")
    await expect(alice.locator(".msg.system.warn")).to_have_count(0)


async def test_demo_offers_kick_only_with_api_access(redis_server: RedisServer, prefix: str, open_page: Opener,
                                                    session: aiohttp.ClientSession) -> None:
    """On a node with --api-key the demo hides kick, until the dashboard's key is in the tab; then kick works."""
    node = NodeProcess("--redis-url", redis_server.url, "--node-id", "k", "--key-prefix", prefix,
                       "--presence-rooms", "*", "--api-key", "s3cret").start()
    bob: Client | None = None
    try:
        bob = await Client.open(session, f"{node.ws_url}?user_id=bob")
        await bob.join("keyed")
        alice = await open_page(demo_url(node, name="alice", room="keyed"))
        await expect(alice.locator("#members li[data-user=bob]")).to_be_visible()
        await expect(alice.locator("#members .kick")).to_have_count(0)
        await alice.evaluate("sessionStorage.setItem('hubnode.apiKey', 's3cret')")  # what the dashboard does
        await alice.reload()
        await alice.click("#members li[data-user=bob] .kick")
        farewell = await bob.recv_type("system_message")
        assert farewell["data"] == {"event": "disconnect", "reason": "kicked by alice", "reconnect": False}
        assert await bob.closed_with() == 4000
        await expect(alice.locator("#members li[data-user=bob]")).to_have_count(0)
    finally:
        if bob is not None:
            await bob.close()
        node.stop()


# -- races between the server's decisions and the page's own frames ----------------------------

class Gate:
    """Routes a page's WebSockets through Playwright: once armed, the first page frame that matches, and
    every frame after it, wait until `release()`, then go to the node in their order."""

    def __init__(self) -> None:
        self.match: Callable[[str], bool] | None = None
        self.queue: list[str | bytes] = []
        self.server: Any = None

    def route(self, ws: Any) -> None:
        self.server = ws.connect_to_server()
        ws.on_message(self._from_page)

    def _from_page(self, message: str | bytes) -> None:
        if self.queue or (self.match is not None and isinstance(message, str) and self.match(message)):
            self.queue.append(message)
        else:
            self.server.send(message)

    def release(self) -> None:
        self.match = None
        queued, self.queue = self.queue, []
        for message in queued:
            self.server.send(message)


async def gated_page(open_page: Opener, node: NodeProcess, user: str, gate: Gate, join: str | None = None) -> Page:
    """controlled_page, with the page's WebSockets going through `gate`."""
    page = await open_page(f"{node.url}/healthz")
    await page.route_web_socket("**/ws*", gate.route)
    script = (CONTROLLED.replace("URLS", json.dumps([node.ws_url])).replace("USER", user)
              .replace("MIN_DELAY", str(MIN_DELAY)).replace("MAX_DELAY", str(MAX_DELAY)))
    if join:
        script += f'hub.join("{join}").then(() => log.push("joined by me"));\n'
    await page.set_content(client_page(script, False))
    await (logged(page, "joined by me") if join else
           page.wait_for_function("() => hub.connected", timeout=TIMEOUT_MS))
    return page


async def members_of(session: aiohttp.ClientSession, node: NodeProcess, room: str) -> list[Any]:
    return list((await api(session, node, "GET", f"/api/rooms/{room}"))["members"])


async def test_hub_js_ignores_a_joined_that_its_own_leave_overtakes(
        nodes: dict[str, NodeProcess], open_page: Opener, session: aiohttp.ClientSession) -> None:
    """The app leaves R while the server joins the user to it: the node sends `joined R` before it reads the
    page's leave_room. hub.js must not put R back in its rejoin set (the leave wins on the node)."""
    a, gate = nodes["a"], Gate()
    page = await gated_page(open_page, a, "sj", gate, join="r1")
    gate.match = lambda frame: '"leave_room"' in frame
    await page.evaluate("hub.leave('r1').then(() => log.push('left by me')); null")
    await wait_until(lambda: bool(gate.queue), timeout=5, what="the page's leave_room to be held")
    await api(session, a, "PUT", "/api/users/sj/rooms/r1")
    await logged(page, "joined r1 0")  # r1 keeps history: the joined carries its offset
    gate.release()
    await logged(page, "left by me")
    assert await members_of(session, a, "r1") == []
    assert "r1" not in await page.evaluate("[...hub.rooms]")


async def test_hub_js_upholds_a_server_side_leave_that_overtakes_its_join(
        nodes: dict[str, NodeProcess], open_page: Opener, session: aiohttp.ClientSession) -> None:
    """The server takes the user out of R while the page's join_room of R is on its way: the node answers
    `left R` first and joins R when it reads the join. hub.js then sends leave_room, so R stays left."""
    a, gate = nodes["a"], Gate()
    page = await gated_page(open_page, a, "sl", gate)
    gate.match = lambda frame: '"join_room"' in frame
    await page.evaluate("hub.join('r2').then(() => log.push('joined by me')); null")
    await wait_until(lambda: bool(gate.queue), timeout=5, what="the page's join_room to be held")
    await api(session, a, "DELETE", "/api/users/sl/rooms/r2")
    await logged(page, "left r2")
    gate.release()
    await logged(page, "joined by me")

    async def left_again() -> bool:
        return await members_of(session, a, "r2") == []
    await wait_until(left_again, timeout=5, what="the page's leave_room after its join")
    assert "r2" not in await page.evaluate("[...hub.rooms]")
