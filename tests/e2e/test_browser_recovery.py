"""Stream recovery (docs/protocol.md) in a real Chromium: hub.js and the demo chat across a node kill.

Three real node processes (a, b, c) with history on share the session's
redis-server. The page connects to a with the URL list [a, b]; bob, an aiohttp
client on c, keeps talking. An outage kills a with SIGKILL while b is frozen
with SIGSTOP, so for as long as it lasts the page is certainly disconnected:
whatever bob sends then can only reach the page through recovery. Every wait
is a Playwright waiting assertion, `wait_for_function` or `wait_until`, with a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from publisher.keys import Keys
from tests.e2e import test_browser
from tests.e2e.test_browser import TIMEOUT_MS, Opener, client_page, demo_url, joined, shot
from tests.helpers import Client, NodeProcess, RedisServer, start_all, sync_redis, wait_until

try:
    from playwright.async_api import Page, expect
except ImportError:  # pragma: no cover - test_browser.py reports it through _browser_available
    pass

# test_browser.py's fixtures: Chromium (skipped or failed as there when it is missing) and its pages.
_browser_available = test_browser._browser_available
browser = test_browser.browser
open_page = test_browser.open_page

HISTORY = ("--history-size", "1000", "--history-ttl", "300")


@pytest.fixture
def nodes(redis_server: RedisServer, prefix: str) -> Iterator[dict[str, NodeProcess]]:
    """Nodes a, b and c with history, each a real process, on one Redis.

    The default heartbeat (2 s) keeps b, frozen for well under a second by an
    outage, from being swept as dead meanwhile.
    """
    started = {name: NodeProcess("--redis-url", redis_server.url, "--node-id", name, "--key-prefix", prefix,
                                 "--rate", "0", *HISTORY) for name in ("a", "b", "c")}
    start_all(started.values())
    try:
        yield started
    finally:
        for node in started.values():
            node.stop()


@contextlib.asynccontextmanager
async def outage(nodes: dict[str, NodeProcess], disconnected: Any) -> AsyncIterator[None]:
    """Kill node a (SIGKILL) while b, the page's next URL, is frozen; `disconnected()` waits for the page to notice.

    Inside the block the page has no connection at all; on leaving it, b
    thaws and the page's pending handshake to b goes through.
    """
    nodes["b"].signal(signal.SIGSTOP)
    try:
        nodes["a"].signal(signal.SIGKILL)
        await disconnected()
        yield
    finally:
        nodes["b"].signal(signal.SIGCONT)


class Talker:
    """bob on node c: room messages m0, m1, … and, after every fifth, a private one p0, p1, … to `to`."""

    def __init__(self, client: Client, room: str, to: str) -> None:
        self.client, self.room, self.to = client, room, to
        self.rooms = self.privates = 0
        self._ids = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def room_message(self, text: str) -> None:
        await self._send("room_message", {"room": self.room, "message": {"text": text, "node": "c"}})

    async def private(self, text: str) -> None:
        await self._send("private_message", {"user_id": self.to, "message": {"text": text, "node": "c"}})

    async def _send(self, mtype: str, data: dict[str, Any]) -> None:
        self._ids += 1
        reply = await self.client.request(mtype, data, fid=f"t{self._ids}")
        assert reply["type"] == "ack", reply

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.room_message(f"m{self.rooms}")
            self.rooms += 1
            if self.rooms % 5 == 0:
                await self.private(f"p{self.privates}")
                self.privates += 1
            await asyncio.sleep(0.02)  # pacing the conversation, not waiting for anything

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def sent_more(self, count: int) -> None:
        """Wait until `count` more room messages have been acked by node c."""
        mark = self.rooms
        await wait_until(lambda: self._task is None or self._task.done() or self.rooms >= mark + count, 10,
                         what=f"{count} more messages from bob")
        if self._task is not None and self._task.done():
            self._task.result()  # bob's failure, if any, is the test's

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task


def texts(page: Page, kind: str) -> Any:
    """The texts of the demo's messages of `kind` ("room", "private"), in page order."""
    return page.locator(f'.msg[data-kind="{kind}"] .text').all_text_contents()


def notice(page: Page, text: str) -> Any:
    return page.locator(".msg.system", has_text=text)


# -- the demo chat ----------------------------------------------------------------------------

async def test_demo_shows_every_message_once_across_a_node_kill(nodes: dict[str, NodeProcess], open_page: Opener,
                                                                session: aiohttp.ClientSession) -> None:
    """The page's node is killed mid-conversation: after the reconnect every message is on the page once, in order.

    bob keeps sending to the room (and privately to alice) before, during and
    after the outage; what he sent during it reaches the page only by
    recovery, and the live copies that overlap the replay are merged by offset.
    """
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    alice = await open_page(demo_url(a, ws=[a.ws_url, b.ws_url], name="alice", room="r"))
    await joined(alice, "r")
    await expect(alice.locator("#status")).to_have_text("node a")
    bob = await Client.open(session, f"{c.ws_url}?user_id=bob")
    talk = Talker(bob, "r", "alice")
    try:
        await bob.join("r")
        talk.start()
        await expect(alice.locator('.msg[data-kind="private"]')).not_to_have_count(0)  # mid-conversation
        async with outage(nodes, lambda: expect(notice(alice, "code 1006")).to_be_visible()):
            await talk.sent_more(10)  # sent while alice has no connection
        await expect(alice.locator("#status")).to_have_text("node b")
        await expect(notice(alice, "back on #r: nothing missed")).to_have_count(1)
        await expect(notice(alice, "back on private messages: nothing missed")).to_have_count(1)
        await talk.sent_more(10)  # live again
        await talk.stop()
        await talk.room_message("end")  # once these are on the page, everything bob sent before them is too
        await talk.private("pend")
        await expect(alice.locator('.msg[data-kind="room"] .text', has_text="end")).to_be_visible()
        await expect(alice.locator('.msg[data-kind="private"] .text', has_text="pend")).to_be_visible()
        assert await texts(alice, "room") == [f"m{n}" for n in range(talk.rooms)] + ["end"]
        assert await texts(alice, "private") == [f"p{n}" for n in range(talk.privates)] + ["pend"]
        await expect(alice.locator(".msg.system.warn")).to_have_count(0)
        await shot(alice, "demo-recovered")
    finally:
        await talk.stop()
        await bob.close()


async def test_demo_notices_a_room_it_could_not_recover(nodes: dict[str, NodeProcess], open_page: Opener,
                                                         session: aiohttp.ClientSession, redis_server: RedisServer,
                                                         prefix: str) -> None:
    """The room's history is lost while the page is away (a new epoch): the page says so, and chats on."""
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    alice = await open_page(demo_url(a, ws=[a.ws_url, b.ws_url], name="alice", room="e"))
    await joined(alice, "e")
    bob = await Client.open(session, f"{c.ws_url}?user_id=bob")
    talk = Talker(bob, "e", "alice")
    try:
        await bob.join("e")
        await talk.room_message("before")
        await expect(alice.locator('.msg[data-kind="room"] .text', has_text="before")).to_be_visible()
        async with outage(nodes, lambda: expect(notice(alice, "code 1006")).to_be_visible()):
            keys = Keys(prefix)
            with sync_redis(redis_server.url) as r:  # Redis loses the room's stream: its next publish starts an epoch
                assert r.delete(keys.stream("room", "e"), keys.stream_meta("room", "e")) > 0
            await talk.room_message("lost")
        await expect(alice.locator("#status")).to_have_text("node b")
        await expect(alice.locator(".msg.system.warn", has_text="#e: messages sent while reconnecting could not "
                                   "be recovered")).to_have_count(1)
        await talk.room_message("after")
        await expect(alice.locator('.msg[data-kind="room"] .text', has_text="after")).to_be_visible()
        assert await texts(alice, "room") == ["before", "after"]
        await shot(alice, "demo-not-recovered")
    finally:
        await bob.close()


# -- hub.js ------------------------------------------------------------------------------------

RECOVERY = """
window.log = [];
window.recovered = [];
window.hub = new HubClient(URLS, { userId: "hal", minDelay: 100 });
hub.on("connected", (m) => log.push("connected " + m.data.node));
hub.on("disconnected", (e) => log.push("disconnected " + e.code));
hub.on("recovered", (e) => recovered.push(e));
hub.on("room_message", (m) => log.push("room " + m.data.message.text + " " + m.offset));
hub.on("private_message", (m) => log.push("private " + m.data.message.text + " " + m.offset));
hub.join("h").then(() => log.push("joined"));
"""


async def test_hub_js_recovers_by_offset_and_reports_each_stream(nodes: dict[str, NodeProcess], open_page: Opener,
                                                                 session: aiohttp.ClientSession,
                                                                 redis_server: RedisServer, prefix: str) -> None:
    """hub.js re-joins with `since` and reconnects with `?since=`; `recovered` reports each stream's outcome.

    The room comes back whole (recovered: true); the user's stream lost its
    history meanwhile (recovered: false, a new epoch).
    """
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    page = await open_page(f"{a.url}/healthz", client_page(RECOVERY.replace("URLS", json.dumps([a.ws_url, b.ws_url])),
                                                           False))
    await page.wait_for_function("() => log.includes('joined')", timeout=TIMEOUT_MS)
    bob = await Client.open(session, f"{c.ws_url}?user_id=bob")
    talk = Talker(bob, "h", "hal")
    try:
        await bob.join("h")
        await talk.room_message("one")
        await talk.private("p-one")
        await page.wait_for_function("() => log.includes('room one 1') && log.includes('private p-one 1')",
                                     timeout=TIMEOUT_MS)
        room_epoch = (await page.evaluate("hub.position('h')"))["epoch"]
        user_epoch = (await page.evaluate("hub.position()"))["epoch"]
        assert await page.evaluate("hub.position('h')") == {"offset": 1, "epoch": room_epoch}
        assert await page.evaluate("hub.position()") == {"offset": 1, "epoch": user_epoch}

        disconnected = lambda: page.wait_for_function(  # noqa: E731
            "() => log.includes('disconnected 1006')", timeout=TIMEOUT_MS)
        async with outage(nodes, disconnected):
            await talk.room_message("two")
            await talk.room_message("three")
            keys = Keys(prefix)
            with sync_redis(redis_server.url) as r:
                assert r.delete(keys.stream("user", "hal"), keys.stream_meta("user", "hal")) > 0
            await talk.private("p-lost")  # the first message of the user stream's new epoch
        await page.wait_for_function("() => recovered.length === 2", timeout=TIMEOUT_MS)
        await talk.room_message("four")
        await talk.private("p-after")
        await page.wait_for_function("() => log.includes('room four 4') && log.includes('private p-after 2')",
                                     timeout=TIMEOUT_MS)
        assert await page.evaluate("log") == [
            "connected a", "joined", "room one 1", "private p-one 1", "disconnected 1006", "connected b",
            "room two 2", "room three 3", "room four 4", "private p-after 2"]
        user, room = await page.evaluate("recovered")  # the user's comes with `connected`, the room's with the ack
        new_epoch = user["epoch"]
        assert new_epoch != user_epoch
        assert user == {"type": "recovered", "stream": "user", "room": None, "user_id": "hal", "recovered": False,
                        "offset": 1, "epoch": new_epoch}
        assert room == {"type": "recovered", "stream": "room", "room": "h", "recovered": True, "offset": 3,
                        "epoch": room_epoch}
        assert await page.evaluate("hub.position()") == {"offset": 2, "epoch": new_epoch}

    finally:
        await bob.close()


REPLAY = """async (epoch) => {
  const raw = [];
  hub._ws.addEventListener("message", (ev) => raw.push(JSON.parse(ev.data)));
  const again = (await hub.join("d")).data || null;  // a plain repeat: the position stays
  const position = hub.position("d");
  const ack = (await hub.join("d", { since: { offset: 0, epoch } })).data || null;
  return { again, position, ack, replayed: raw.filter((m) => m.type === "room_message").map((m) => m.offset) };
}"""


async def test_hub_js_drops_a_replay_of_what_it_delivered(nodes: dict[str, NodeProcess], open_page: Opener,
                                                          session: aiohttp.ClientSession) -> None:
    """A join with `since` 0 on the live connection: the node replays offsets 1-3; hub.js delivers none again."""
    a, c = nodes["a"], nodes["c"]
    script = RECOVERY.replace("URLS", json.dumps([a.ws_url])).replace('hub.join("h")', 'hub.join("d")')
    page = await open_page(f"{a.url}/healthz", client_page(script, False))
    await page.wait_for_function("() => log.includes('joined')", timeout=TIMEOUT_MS)
    bob = await Client.open(session, f"{c.ws_url}?user_id=bob")
    talk = Talker(bob, "d", "hal")
    try:
        await bob.join("d")
        for text in ("one", "two", "three"):
            await talk.room_message(text)
        await page.wait_for_function("() => log.includes('room three 3')", timeout=TIMEOUT_MS)
        epoch = (await page.evaluate("hub.position('d')"))["epoch"]
        result = await page.evaluate(REPLAY, epoch)
        assert result["position"] == {"offset": 3, "epoch": epoch}
        assert result["replayed"] == [1, 2, 3], result
        assert result["ack"] == {"recovered": True, "offset": 3, "epoch": epoch}, result
        assert await page.evaluate("log") == ["connected a", "joined", "room one 1", "room two 2", "room three 3"]
        assert await page.evaluate("hub.position('d')") == {"offset": 3, "epoch": epoch}
    finally:
        await bob.close()
