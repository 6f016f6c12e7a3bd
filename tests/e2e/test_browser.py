"""hub.js, the demo chat and the dashboard in a real Chromium (Playwright), on real nodes.

Cluster tests run two `hubnode` processes (nodes "a" and "b") on the session's
redis-server; single-node tests use the in-process `hub` fixture; the dashboard
behind nginx runs the `make cluster` topology (deploy.cluster). Every wait is
a Playwright waiting assertion or `wait_for_function` with a deadline.
Screenshots go to test-output/browser/.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from deploy.cluster import Cluster, ClusterError, find_executable
from hubnode.app import NODE
from hubnode.errors import CloseCode
from tests.conftest import node_config, start_server
from tests.helpers import (
    ROOT,
    SCALE,
    Client,
    NodeProcess,
    RedisServer,
    free_port,
    missing,
    start_all,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 10_000 * SCALE
SHOTS = ROOT / "test-output" / "browser"

# Why the browser tests cannot run here, or None. Each test then skips, or fails
# under HUB_TEST_REQUIRE_ALL=1 (`make test`, after `make sysdeps` installed both).
UNAVAILABLE: str | None = None
try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:  # pragma: no cover - playwright is in the dev extra
    UNAVAILABLE = "playwright is not installed: pip install -e '.[server,dev]'"
else:
    expect.set_options(timeout=TIMEOUT_MS)
    if not CHROMIUM.exists():  # pragma: no cover - `make sysdeps` installs it
        UNAVAILABLE = "Debian's chromium is not installed: run `make sysdeps`"


@pytest.fixture(autouse=True)
def _browser_available() -> None:
    """Every test here needs playwright and chromium: skip without them, or fail when they are required."""
    if UNAVAILABLE is not None:
        missing(UNAVAILABLE)


class Opener(Protocol):
    def __call__(self, url: str, html: str | None = None, width: int = 900, height: int = 700) -> Awaitable[Page]:
        ...


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[Opener]:
    """Open a URL in a fresh browser context; with `html`, then show this page on the URL's origin.

    Uncaught JavaScript errors in any page fail the test at teardown.
    """
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    async def opener(url: str, html: str | None = None, width: int = 900, height: int = 700) -> Page:
        context = await browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
        await page.goto(url)
        if html is not None:
            # Replace the document but keep the node's origin (a page served by
            # page.route would count as public and be barred from loopback).
            await page.set_content(html)
        return page

    yield opener
    for context in contexts:
        await context.close()
    assert not errors, errors


def node_pair(redis_server: RedisServer, prefix: str, *extra: str) -> Iterator[dict[str, NodeProcess]]:
    """Nodes "a" and "b", each a real process, on one Redis, heartbeating every 0.5 s."""
    nodes = {name: NodeProcess("--redis-url", redis_server.url, "--node-id", name, "--heartbeat", "0.5",
                               "--key-prefix", prefix, *extra) for name in ("a", "b")}
    start_all(nodes.values())
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


@pytest.fixture
def cluster(redis_server: RedisServer, prefix: str) -> Iterator[dict[str, NodeProcess]]:
    """Nodes "a" and "b", each a real process, on one Redis, heartbeating every 0.5 s."""
    yield from node_pair(redis_server, prefix)


@pytest.fixture
def presence_cluster(redis_server: RedisServer, prefix: str) -> Iterator[dict[str, NodeProcess]]:
    """The same with presence events in every room: the demo's member list follows them."""
    yield from node_pair(redis_server, prefix, "--presence-rooms", "*")


# -- helpers ---------------------------------------------------------------------------

def demo_url(node: NodeProcess, ws: list[str] | None = None, **params: str) -> str:
    """The demo chat on `node`; `ws`: the node URLs its hub.js uses instead of its own /ws."""
    if ws:
        params["ws"] = ",".join(ws)
    return f"{node.url}/?{urlencode(params)}"


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


def room_message(page: Page, sender: str, text: str) -> Any:
    return page.locator(f'.msg[data-kind="room"][data-from="{sender}"]', has_text=text)


async def joined(page: Page, room: str) -> None:
    await expect(page.locator(".msg.system", has_text=f"joined #{room}")).to_have_count(1)


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"))


def client_page(script: str, module: bool) -> str:
    """A page running `script` with HubClient from /hub.mjs (module) or /hub.js (plain script)."""
    if module:
        return ('<!doctype html><script type="module">\nimport HubClient, { HubClient as Named } '
                'from "/hub.mjs";\nwindow.sameClass = HubClient === Named;\n' + script + "\n</script>")
    return '<!doctype html><script src="/hub.js"></script><script>\nwindow.sameClass = true;\n' + script + "\n</script>"


async def results(page: Page, timeout: float = TIMEOUT_MS) -> Any:
    """Wait for the page script to set `window.results`, and return it."""
    await page.wait_for_function("() => window.results !== undefined", timeout=timeout)
    return await page.evaluate("window.results")


# -- hub.js ----------------------------------------------------------------------------

REQUESTS = """
(async () => {
  const hub = new HubClient("/ws", { userId: "tess" });
  const echo = new Promise((resolve) => hub.on("room_message", resolve));
  const code = (promise) => promise.then(() => "resolved", (err) => err.code);
  const r = { sameClass: window.sameClass };
  r.join = (await hub.join("t")).type;
  r.send = (await hub.sendToRoom("t", "hi")).type;
  r.echo = (await echo).data.message;
  r.notInRoom = await code(hub.sendToRoom("elsewhere", "x"));
  r.badRoom = await code(hub.join("two words"));
  r.rooms = [...hub.rooms];
  r.broadcast = (await hub.broadcast({ to: "all" })).type;
  r.pong = (await hub.ping("p")).data;
  r.leave = (await hub.leave("t")).type;
  r.afterLeave = await code(hub.sendToRoom("t", "gone"));
  r.node = hub.node;
  r.user = hub.info.user_id;
  hub.close();
  r.afterClose = await code(hub.sendToRoom("t", "late"));
  window.results = r;
})();
"""


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
async def test_hub_js_requests_settle_by_ack_or_error(hub: TestServer, open_page: Opener, module: bool) -> None:
    """hub.js as a plain script and as an ES module: calls resolve on acks and reject with the error code."""
    page = await open_page(str(hub.make_url("/healthz")), client_page(REQUESTS, module))
    assert await results(page) == {
        "sameClass": True, "join": "ack", "send": "ack", "echo": "hi", "notInRoom": "not_in_room",
        "badRoom": "bad_room", "rooms": ["t"], "broadcast": "ack", "pong": "p", "leave": "ack",
        "afterLeave": "not_in_room", "node": "n1", "user": "tess", "afterClose": "closed",
    }


TOKEN = """
window.events = [];
window.calls = 0;
const token = async () => {
  if (++calls === 1) throw new Error("no token yet");
  return TOKEN;
};
const hub = new HubClient("/ws", { token, minDelay: 50 });
hub.on("connected", (m) => events.push("connected " + m.data.user_id + " " + calls));
hub.on("disconnected", (e) => events.push("disconnected " + e.code + " " + e.reason));
hub.join("ok-1").then(() => events.push("joined ok-1"));
hub.join("other").catch((err) => events.push("other: " + err.code));
"""


async def test_hub_js_asks_the_token_function_on_every_connect(open_page: Opener) -> None:
    """With --auth jwt, hub.js connects with its token function's token, asking again on each (re)connect."""
    secret = "a-secret-for-the-browser-tests-32-bytes"
    server = await start_server(node_config(auth="jwt", jwt_secret=secret, allowed_origins=("*",)))
    try:
        token = jwt.encode({"sub": "jane", "exp": int(time.time()) + 600, "rooms": ["ok-*"]}, secret)
        script = TOKEN.replace("TOKEN;", f'"{token}";')
        page = await open_page(str(server.make_url("/healthz")), client_page(script, False))
        await page.wait_for_function("() => events.length === 4", timeout=TIMEOUT_MS)
        events = await page.evaluate("events")
        assert events[0] == "disconnected 1006 no token yet"  # a throwing token function: retried
        assert sorted(events[1:]) == ["connected jane 2", "joined ok-1", "other: forbidden"]
        for conn in list(server.app[NODE].conns.values()):
            await conn.close(CloseCode.TRY_AGAIN_LATER, "test")
        await page.wait_for_function("() => events.includes('connected jane 3')", timeout=TIMEOUT_MS)
    finally:
        await server.close()


BACKOFF = """
const delays = [];
const hub = new HubClient(URLS, { minDelay: 40, maxDelay: 320 });
hub.on("disconnected", (e) => {
  delays.push(e.delay);
  if (delays.length === 6) { hub.close(); window.results = delays; }
});
"""


async def test_hub_js_backoff_grows_with_jitter_up_to_the_cap(hub: TestServer, open_page: Opener) -> None:
    """Failed connects are retried after jittered delays that double from minDelay up to maxDelay."""
    script = BACKOFF.replace("URLS", f'["ws://127.0.0.1:{free_port()}/ws"]')
    delays = await results(await open_page(str(hub.make_url("/healthz")), client_page(script, False)))
    for attempt, delay in enumerate(delays):
        ceiling = min(320, 40 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling, (attempt, delays)


STABLE = """
window.events = [];
window.hub = new HubClient(URLS, { minDelay: 400, stableAfter: 300 });
hub.on("connected", () => events.push("connected " + hub.attempts));
hub.on("disconnected", (e) => events.push(e.delay));
"""


async def test_hub_js_backoff_resets_after_a_stable_connection(hub: TestServer, open_page: Opener) -> None:
    """A connection that lasts stableAfter resets the backoff: the next drop retries after minDelay at most."""
    dead, live = f"ws://127.0.0.1:{free_port()}/ws", str(hub.make_url("/ws"))
    script = STABLE.replace("URLS", f'["{dead}", "{live}"]')  # first attempt fails, second connects
    page = await open_page(str(hub.make_url("/healthz")), client_page(script, False))
    await page.wait_for_function("() => events.includes('connected 1')", timeout=TIMEOUT_MS)
    await page.wait_for_function("() => hub.attempts === 0", timeout=TIMEOUT_MS)
    for conn in list(hub.app[NODE].conns.values()):
        await conn.close(CloseCode.TRY_AGAIN_LATER, "test")
    await page.wait_for_function("() => events.length >= 3", timeout=TIMEOUT_MS)
    events = (await page.evaluate("events"))[:3]
    assert 200 <= events[0] <= 400 and events[1] == "connected 1" and 200 <= events[2] <= 400, events


BACKGROUND = """
window.events = [];
const hub = new HubClient(URLS, { userId: "sleepy", pingInterval: 300, pingTimeout: 700 });
hub.on("connected", (m) => events.push("connected " + m.data.node));
hub.on("disconnected", (e) => events.push("disconnected: " + e.reason));
"""

HIDE = """() => {
  Object.defineProperty(document, "visibilityState", { get: () => "hidden", configurable: true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


async def test_background_ping_notices_a_frozen_node(cluster: dict[str, NodeProcess], open_page: Opener) -> None:
    """In a hidden tab hub.js pings; a node frozen by SIGSTOP misses the pong and the page moves on."""
    a, b = cluster["a"], cluster["b"]
    script = BACKGROUND.replace("URLS", f'["{a.ws_url}", "{b.ws_url}"]')
    page = await open_page(f"{a.url}/healthz", client_page(script, False))
    await page.wait_for_function("() => events.includes('connected a')", timeout=TIMEOUT_MS)
    await page.evaluate(HIDE)
    a.signal(signal.SIGSTOP)
    try:
        await page.wait_for_function("() => events.includes('connected b')", timeout=TIMEOUT_MS)
    finally:
        a.signal(signal.SIGCONT)
    assert "disconnected: no pong within 700 ms" in await page.evaluate("events")


# -- the demo chat ----------------------------------------------------------------------------

async def test_demo_pages_on_two_nodes_chat_in_one_room(presence_cluster: dict[str, NodeProcess],
                                                       open_page: Opener) -> None:
    """Two demo pages on different nodes share a room: each sees the other's messages and node, and both members."""
    a, b = presence_cluster["a"], presence_cluster["b"]
    alice = await open_page(demo_url(a, name="alice", room="r1"))
    bob = await open_page(f"{b.url}/", width=390, height=760)  # a phone, live at once as a guest...
    await expect(bob.locator("#status")).to_have_text("node b")
    await joined(bob, "lobby")
    await bob.fill("#name", "bob")  # ...then renamed and moved with the settings form
    await bob.fill("#room", "r1")
    await bob.click("#settings button")
    await joined(bob, "r1")
    await joined(alice, "r1")
    await expect(alice.locator("#status")).to_have_text("node a")
    await say(alice, "hello from a")
    await expect(room_message(bob, "alice", "hello from a")).to_contain_text("via node a")
    await say(bob, "hello from b")
    await expect(room_message(alice, "bob", "hello from b")).to_contain_text("via node b")
    await expect(alice.locator("#members li[data-user=bob]")).to_contain_text("node b")
    await expect(alice.locator("#members li[data-user=alice]")).to_contain_text("node a")
    await expect(room_message(alice, "alice", "hello from a")).to_have_class(re.compile(r"\bmine\b"))
    await shot(bob, "demo-phone")


async def test_demo_private_message_reaches_only_its_target(presence_cluster: dict[str, NodeProcess],
                                                            open_page: Opener) -> None:
    """A private message from a page on node a reaches bob on node b, not carol beside him."""
    a, b = presence_cluster["a"], presence_cluster["b"]
    alice = await open_page(demo_url(a, name="alice", room="team"))
    bob = await open_page(demo_url(b, name="bob", room="team"))
    carol = await open_page(demo_url(b, name="carol", room="team"))
    for page in (alice, bob, carol):
        await joined(page, "team")
    await say(carol, "morning")
    await expect(room_message(alice, "carol", "morning")).to_be_visible()
    await alice.click("#members li[data-user=bob]")  # picks bob as the private recipient
    await expect(alice.locator("#to")).to_have_value("bob")
    await say(alice, "just for you")
    await expect(bob.locator('.msg[data-kind="private"][data-from="alice"]')).to_contain_text("just for you")
    await expect(alice.locator(".msg.private.mine")).to_contain_text("to bob")
    await say(bob, "thanks")
    await alice.select_option("#to", "")  # back to the room
    await say(alice, "to everyone")
    # carol is on bob's node and the room message was published after the private one:
    # once it is on her page, the private one would have been too.
    await expect(room_message(carol, "alice", "to everyone")).to_be_visible()
    await expect(carol.locator('.msg[data-kind="private"]')).to_have_count(0)
    await expect(room_message(alice, "bob", "thanks")).to_be_visible()
    await shot(alice, "demo")


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_demo_page_moves_to_the_other_node_when_its_node_goes(cluster: dict[str, NodeProcess],
                                                                    open_page: Opener, how: str) -> None:
    """A page whose node is killed (SIGKILL) or drained (SIGTERM) moves to the other node and chats on, no reload."""
    a, b = cluster["a"], cluster["b"]
    alice = await open_page(demo_url(a, ws=[a.ws_url, b.ws_url], name="alice", room="r"))
    bob = await open_page(demo_url(b, name="bob", room="r"))
    await joined(alice, "r")
    await joined(bob, "r")
    await expect(alice.locator("#status")).to_have_text("node a")
    await alice.evaluate("window.sameDocument = true")
    await say(alice, "before")
    await expect(room_message(bob, "alice", "before")).to_be_visible()

    a.signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    await expect(alice.locator("#status")).to_have_text("node b")
    if how == "drain":
        await expect(alice.locator(".msg.system", has_text="moving to another one")).to_be_visible()
        await expect(alice.locator(".msg.system", has_text="code 1001")).to_contain_text("retrying in 0.")
    else:
        await expect(alice.locator(".msg.system", has_text="code 1006")).to_be_visible()
    await expect(alice.locator(".msg.system", has_text="connected to node b")).to_be_visible()

    await say(alice, "after")  # the room was re-joined by hub.js, not by the page
    await expect(room_message(bob, "alice", "after")).to_contain_text("via node b")
    await say(bob, "welcome")
    await expect(room_message(alice, "bob", "welcome")).to_be_visible()
    assert await alice.evaluate("window.sameDocument") is True
    await expect(room_message(alice, "alice", "before")).to_be_visible()
    await shot(alice, f"demo-after-{how}")


async def test_demo_shows_resync_after_redis_restart(open_page: Opener) -> None:
    """When its node loses and regains Redis, the demo page shows hub.js's resync event."""
    redis = RedisServer()
    redis.start()
    node = NodeProcess("--redis-url", redis.url, "--node-id", "solo", "--heartbeat", "0.5").start()
    try:
        page = await open_page(demo_url(node, name="rita"))
        await joined(page, "lobby")
        redis.restart()
        await expect(page.locator(".msg.system", has_text="messages may be missing")).to_be_visible(
            timeout=3 * TIMEOUT_MS)
        await expect(page.locator("#status")).to_have_text("node solo")
    finally:
        node.stop()
        redis.stop()


# -- the dashboard --------------------------------------------------------------------------

async def test_dashboard_shows_nodes_rooms_and_every_nodes_traffic(cluster: dict[str, NodeProcess],
                                                                   open_page: Opener) -> None:
    """The dashboard lists both live nodes with their clients, the room's member count, and both nodes' traffic."""
    a, b = cluster["a"], cluster["b"]
    alice = await open_page(demo_url(a, name="alice", room="ops"))
    bob = await open_page(demo_url(b, name="bob", room="ops"))
    await joined(alice, "ops")
    await joined(bob, "ops")
    dash = await open_page(f"{a.url}/dashboard")
    await expect(dash.locator("#status")).to_have_text("live · 2 nodes")
    for node_id in ("a", "b"):
        row = dash.locator(f"#nodes tr[data-node={node_id}]")
        await expect(row.locator("td.clients")).to_have_text("1")
        await expect(row.locator("td.age")).to_have_text(re.compile(r"^\d+\.\d s ago$"))
    await expect(dash.locator("#rooms tr[data-room=ops] td.count")).to_have_text("2")
    await expect(dash.locator("#t-nodes")).to_have_text("2")
    await expect(dash.locator("#t-clients")).to_have_text("2")
    for n in range(3):
        await say(alice, f"ping {n}")
        await expect(room_message(bob, "alice", f"ping {n}")).to_be_visible()
    # 3 frames to alice on node a, 3 to bob on node b (read from b's snapshot in Redis)
    await expect(dash.locator("#t-rate")).to_have_text("6")
    await expect(dash.locator("#l-latency b").first).to_have_text(re.compile(r"^[\d.]+ ms$"))
    await expect(dash.locator("#nodes")).not_to_contain_text("(this)")
    await shot(dash, "dashboard")


@pytest.fixture
def nginx_cluster() -> Iterator[Cluster]:
    """The `make cluster` topology on free ports: redis-server, node1..node3 and nginx round-robin in front."""
    try:
        find_executable("nginx")
    except ClusterError as exc:
        missing(str(exc))
    cluster = Cluster(port=0, nodes=3, node_args=("--heartbeat", "0.5")).start(timeout=30 * SCALE)
    try:
        yield cluster
    finally:
        cluster.stop()


WATCH_BADGE = """() => {
  const badge = document.getElementById("status");
  window.badges = [badge.textContent];
  new MutationObserver(() => badges.push(badge.textContent))
    .observe(badge, { childList: true, characterData: true, subtree: true });
}"""

POSITIVE = re.compile(r"^(?!0$)\d+(\.\d+)?k?$")


async def steady_traffic(session: aiohttp.ClientSession, url: str, room: str) -> None:
    """POST a message to `room` through nginx about 20 times a second, until cancelled."""
    n = 0
    while True:
        async with session.post(f"{url}/broadcast", json={"type": "tick", "data": n, "room": room}) as resp:
            assert resp.status == 202, await resp.text()
        n += 1
        await asyncio.sleep(0.05)  # pacing a load generator, not waiting for anything


async def test_dashboard_behind_nginx_shows_every_nodes_series(nginx_cluster: Cluster, open_page: Opener,
                                                               session: aiohttp.ClientSession) -> None:
    """Through nginx (each request to another node) the page shows all three nodes' own rates and a steady badge.

    Clients on node1 and node2 receive a steady stream; node3 has none. Each
    row must show its own node's delivered/s (node3: 0), which no single node's
    /api/metrics could give, and the badge must not change with the answering node.
    """
    c = nginx_cluster
    clients = [await Client.open(session, c.node_url(n).replace("http", "ws", 1) + "/ws") for n in ("node1", "node2")]
    traffic: asyncio.Task[None] | None = None
    try:
        for client in clients:
            await client.join("dash")
        dash = await open_page(f"{c.url}/dashboard")
        await dash.evaluate(WATCH_BADGE)
        traffic = asyncio.create_task(steady_traffic(session, c.url, "dash"))
        for node_id, clients_there in (("node1", "1"), ("node2", "1"), ("node3", "0")):
            row = dash.locator(f"#nodes tr[data-node={node_id}]")
            await expect(row.locator("td.clients")).to_have_text(clients_there)
            await expect(row.locator("td.rate")).to_have_text(POSITIVE if clients_there == "1" else "0")
        for series in ("mean", "p99"):
            await expect(dash.locator(f"#l-latency span[data-series={series}] b")).to_have_text(
                re.compile(r"^[\d.]+k? ms$"))
        for node_id in ("node1", "node2"):
            await expect(dash.locator(f"#nodes tr[data-node={node_id}] td.p99")).to_have_text(
                re.compile(r"^[\d.]+k? ms$"))
        await expect(dash.locator("#l-rate span[data-series=node1] b")).to_have_text(POSITIVE)
        await expect(dash.locator("#t-rate")).to_have_text(POSITIVE)
        await dash.wait_for_function("() => badges.length >= 6", timeout=TIMEOUT_MS)  # 5 refreshes or more
        await shot(dash, "dashboard-nginx")
        assert set(await dash.evaluate("badges")) <= {"loading…", "live · 3 nodes"}
    finally:
        if traffic is not None:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        for client in clients:
            await client.close()


async def test_dashboard_asks_for_the_api_key(open_page: Opener) -> None:
    """With --api-key set the dashboard asks for the key, says when it is wrong, and shows data with the right one."""
    server = await start_server(node_config(api_key=("s3cret",)))
    try:
        dash = await open_page(str(server.make_url("/dashboard")), width=390, height=760)
        await expect(dash.locator("#key-form")).to_be_visible()
        await expect(dash.locator("#content")).to_be_hidden()
        await dash.fill("#key", "wrong")
        await dash.press("#key", "Enter")
        await expect(dash.locator("#key-error")).to_have_text("That key was refused.")
        await dash.fill("#key", "s3cret")
        await dash.press("#key", "Enter")
        await expect(dash.locator("#nodes tr[data-node=n1]")).to_be_visible()
        await expect(dash.locator("#key-form")).to_be_hidden()
        await shot(dash, "dashboard-phone")
    finally:
        await server.close()

