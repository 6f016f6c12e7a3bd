"""Stream history and recovery against real nodes and a real Redis (docs/protocol.md).

Most tests share one module cluster: three nodes on the session's Redis with
`--history-size 60 --history-rooms h-*`, so rooms named `h-…` keep their last
60 messages and every other room has none; user streams keep history (the
default). The TTL test and the memory-broker test run nodes of their own.
Faults (kill -9, subscriber loss, Redis data loss) are in test_history_faults.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from publisher import Publisher
from tests.helpers import (
    ROOT,
    Client,
    Cluster,
    NodeProcess,
    RedisServer,
    deadline,
    sync_redis,
    wait_until,
)

PREFIX = "hist:"
SIZE = 60  # --history-size of the module cluster
PATTERNS = "h-*"  # --history-rooms of the module cluster


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Three nodes with history for the whole module; tests use distinct rooms and users."""
    c = Cluster(redis_server.url, PREFIX, n=3,
                extra=("--history-size", str(SIZE), "--history-rooms", PATTERNS)).start()
    yield c
    c.stop()


@pytest.fixture
def pub(redis_server: RedisServer) -> Iterator[Publisher]:
    """A worker's publisher with the nodes' history settings (it creates the streams they would)."""
    with Publisher(redis_server.url, key_prefix=PREFIX, history_size=SIZE, history_rooms=PATTERNS) as p:
        yield p


# -- helpers ------------------------------------------------------------------------------

async def connect(session: aiohttp.ClientSession, cluster: Cluster, i: int, user: str | None = None,
                  since: str | None = None) -> Client:
    query = [f"user_id={user}"] if user else []
    if since is not None:
        query.append(f"since={since}")
    return await Client.open(session, cluster.nodes[i].ws_url + ("?" + "&".join(query) if query else ""))


async def join_since(client: Client, room: str, since: dict[str, Any] | None = None, fid: int | str = "j",
                     data: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send join_room (with `since` when given); returns (every frame before the answer, the answer)."""
    if data is None:
        data = room if since is None else {"room": room, "since": since}
    await client.send({"type": "join_room", "data": data, "id": fid})
    before: list[dict[str, Any]] = []
    end = deadline(10)
    while True:
        frame = await client.recv(max(0.01, end - time.monotonic()))
        if frame.get("id") == fid and frame["type"] in ("ack", "error"):
            return before, frame
        before.append(frame)


async def recv_n(client: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Exactly the next `n` frames, within one deadline."""
    end = deadline(timeout)
    frames: list[dict[str, Any]] = []
    try:
        while len(frames) < n:
            frames.append(await client.recv(max(0.01, end - time.monotonic())))
    except TimeoutError:
        raise AssertionError(f"only {len(frames)} of {n} frames arrived: {frames[-3:]}") from None
    return frames


async def recv_until_offset(client: Client, top: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Frames until one with offset `top` arrived (the last one returned is it)."""
    end = deadline(timeout)
    frames: list[dict[str, Any]] = []
    try:
        while not frames or frames[-1].get("offset") != top:
            frames.append(await client.recv(max(0.01, end - time.monotonic())))
    except TimeoutError:
        raise AssertionError(f"offset {top} never arrived; {len(frames)} frames, last {frames[-3:]}") from None
    return frames


async def handshake_status(session: aiohttp.ClientSession, url: str) -> int:
    """The HTTP status of a WebSocket handshake (101 when it upgraded; the socket is closed again)."""
    try:
        ws = await session.ws_connect(url)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


def say(room: str, text: str) -> dict[str, Any]:
    return {"type": "room_message", "data": {"room": room, "message": text}}


def content(frame: dict[str, Any]) -> Any:
    """What a frame says: a client's room/private message text, else the data a worker published."""
    data = frame.get("data")
    if frame["type"] in ("room_message", "private_message") and isinstance(data, dict):
        return data["message"]
    return data


def offsets(frames: list[dict[str, Any]]) -> list[int]:
    return [f["offset"] for f in frames]


class Paced(threading.Thread):
    """A worker thread publishing `count` messages at about `rate` per second with its own Publisher.

    The pacing shapes the load; nothing waits on it for synchronisation.
    """

    def __init__(self, publish: Callable[[Publisher, int], Any], url: str, prefix: str, count: int,
                 rate: float, **settings: Any) -> None:
        super().__init__(daemon=True)
        self.publish, self.url, self.prefix, self.count, self.rate = publish, url, prefix, count, rate
        self.settings = settings
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Publisher(self.url, key_prefix=self.prefix, **self.settings) as p:
                began = time.monotonic()
                for i in range(self.count):
                    self.publish(p, i)
                    self.sent += 1
                    ahead = began + (i + 1) / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    async def finish(self, timeout: float = 30.0) -> None:
        await wait_until(lambda: not self.is_alive(), timeout=timeout, what="the worker thread to finish")
        if self.error is not None:
            raise AssertionError(f"the worker failed after {self.sent} messages: {self.error!r}")


# -- recovery on join ------------------------------------------------------------------

async def test_reconnect_to_another_node_recovers_exactly_the_50_missed(
        cluster: Cluster, session: aiohttp.ClientSession, pub: Publisher) -> None:
    """A client leaves, a worker publishes 50, the client rejoins on another node with since:
    those 50 in order with contiguous offsets, then the ack (recovered: true), then live ones."""
    room = "h-leave"
    a = await connect(session, cluster, 0, "h-leaver")
    replay, ack = await join_since(a, room)
    assert replay == [] and ack["type"] == "ack"
    assert set(ack["data"]) == {"offset", "epoch"}, ack  # a join without since learns the position
    epoch, start = ack["data"]["epoch"], ack["data"]["offset"]
    assert isinstance(epoch, str) and epoch and start == 0
    for i in range(3):
        pub.broadcast_to_room(room, {"type": "chat", "data": f"before-{i}"})
    live = await recv_n(a, 3)
    assert offsets(live) == [1, 2, 3] and {f["epoch"] for f in live} == {epoch}
    last = live[-1]["offset"]
    await a.close()

    for i in range(50):
        pub.broadcast_to_room(room, {"type": "chat", "data": f"missed-{i}"})

    b = await connect(session, cluster, 1, "h-leaver")
    assert b.connected["node"] != "n1"
    replay, ack = await join_since(b, room, {"offset": last, "epoch": epoch})
    assert [content(f) for f in replay] == [f"missed-{i}" for i in range(50)]
    assert offsets(replay) == list(range(last + 1, last + 51))
    assert all(f["type"] == "chat" and f["room"] == room and f["epoch"] == epoch for f in replay)
    assert ack == {"type": "ack", "id": "j", "data": {"recovered": True, "offset": last + 50, "epoch": epoch}}
    for i in range(3):
        pub.broadcast_to_room(room, {"type": "chat", "data": f"after-{i}"})
    after = await recv_n(b, 3)
    assert [content(f) for f in after] == ["after-0", "after-1", "after-2"]
    assert offsets(after) == [last + 51, last + 52, last + 53]
    await b.expect_silence()


async def test_window_exact_size_recovers_one_more_does_not(
        cluster: Cluster, session: aiohttp.ClientSession, pub: Publisher) -> None:
    """--history-size 60: 60 missed are all replayed; 61 missed get recovered: false and no replay."""
    room = "h-window"
    a = await connect(session, cluster, 0, "h-win-a")
    b = await connect(session, cluster, 1, "h-win-b")
    _, ack_a = await join_since(a, room)
    _, ack_b = await join_since(b, room)
    epoch, start = ack_a["data"]["epoch"], ack_a["data"]["offset"]
    assert ack_b["data"] == {"offset": start, "epoch": epoch}
    await a.close()
    await b.close()

    for i in range(SIZE):
        pub.broadcast_to_room(room, {"type": "w", "data": i})
    a2 = await connect(session, cluster, 2, "h-win-a")
    replay, ack = await join_since(a2, room, {"offset": start, "epoch": epoch})
    assert offsets(replay) == list(range(start + 1, start + SIZE + 1))  # the whole window, exactly
    assert ack["data"] == {"recovered": True, "offset": start + SIZE, "epoch": epoch}

    pub.broadcast_to_room(room, {"type": "w", "data": SIZE})  # offset start+1 leaves the window
    assert (await a2.recv())["offset"] == start + SIZE + 1
    b2 = await connect(session, cluster, 2, "h-win-b")
    replay, ack = await join_since(b2, room, {"offset": start, "epoch": epoch})
    assert replay == []
    assert ack["data"] == {"recovered": False, "offset": start + SIZE + 1, "epoch": epoch}
    pub.broadcast_to_room(room, {"type": "w", "data": "live"})
    for client in (a2, b2):  # and it carries on from the top, like everyone else
        frame = await client.recv()
        assert (frame["offset"], frame["data"]) == (start + SIZE + 2, "live")
        await client.expect_silence()


async def test_room_outside_history_rooms_has_no_positions(
        cluster: Cluster, session: aiohttp.ClientSession, pub: Publisher) -> None:
    """A room not matching --history-rooms: no offset/epoch on messages, no position in acks, no stream."""
    room = "plain-room"
    a = await connect(session, cluster, 0, "h-plain-a")
    b = await connect(session, cluster, 1, "h-plain-b")
    replay, ack = await join_since(a, room)
    assert replay == [] and ack == {"type": "ack", "id": "j"}
    replay, ack = await join_since(b, room, {"offset": 0, "epoch": "abc"})
    assert replay == [] and ack["type"] == "ack"
    assert "offset" not in ack.get("data", {}) and "epoch" not in ack.get("data", {})
    assert ack.get("data", {}).get("recovered", False) is False
    await a.send(say(room, "hello"))
    pub.broadcast_to_room(room, {"type": "w", "data": 1})
    for client in (a, b):
        frames = await recv_n(client, 2)
        assert [content(f) for f in frames] == ["hello", 1]
        assert all("offset" not in f and "epoch" not in f for f in frames), frames
    assert pub.history(room).to_json() == {"epoch": None, "offset": 0, "messages": []}
    r = sync_redis(cluster.redis_url)
    assert r.exists(f"{PREFIX}stream:room:{{{room}}}", f"{PREFIX}stream:room:{{{room}}}:meta") == 0


# -- recovery of the user stream ---------------------------------------------------------

async def test_user_stream_recovered_through_since_on_connect(
        cluster: Cluster, session: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """?since=O:E: `connected` says recovered/offset/epoch, then the missed private_message and
    publisher messages, then live ones (a worker keeps publishing during the reconnect)."""
    user = "h-urec"
    sender = await connect(session, cluster, 1, "h-usender")
    u = await connect(session, cluster, 0, user)
    assert "recovered" not in u.connected
    epoch, start = u.connected["epoch"], u.connected["offset"]
    assert isinstance(epoch, str) and epoch and start == 0
    reply = await sender.request("private_message", {"user_id": user, "message": "pm-first"}, fid="p0")
    assert reply["type"] == "ack"
    first = await u.recv()
    assert (first["type"], first["user_id"], first["data"], first["offset"], first["epoch"]) == (
        "private_message", "h-usender", {"to": user, "message": "pm-first"}, 1, epoch)
    await u.close()

    # missed: private messages and a worker's broadcast_to_user, interleaved; this publisher has
    # no history settings of its own: the stream has history, so it appends all the same
    expected: list[Any] = []
    with Publisher(redis_server.url, key_prefix=PREFIX) as plain:
        for i in range(3):
            reply = await sender.request("private_message", {"user_id": user, "message": f"pm-{i}"}, fid=f"p{i + 1}")
            assert reply["type"] == "ack"
            expected.append(f"pm-{i}")
            if i < 2:
                plain.broadcast_to_user(user, {"type": "notice", "data": f"pub-{i}"})
                expected.append(f"pub-{i}")
        assert plain.history(user=user).offset == 6

    live_count = 40
    worker = Paced(lambda p, i: p.broadcast_to_user(user, {"type": "notice", "data": f"live-{i}"}),
                   redis_server.url, PREFIX, live_count, rate=150)
    worker.start()
    await wait_until(lambda: worker.sent >= 5, timeout=5, what="live traffic to the user")
    u2 = await connect(session, cluster, 2, user, since=f"1:{epoch}")
    assert u2.connected["node"] == "n3"
    assert u2.connected["recovered"] is True and u2.connected["epoch"] == epoch
    # its offset is the client's own: the replay follows above it
    assert u2.connected["offset"] == 1
    await worker.finish()
    frames = await recv_until_offset(u2, 6 + live_count)
    assert offsets(frames) == list(range(2, 7 + live_count))  # each once, in order, no gap
    assert [content(f) for f in frames[:5]] == expected
    assert [content(f) for f in frames[5:]] == [f"live-{i}" for i in range(live_count)]
    assert all(f["epoch"] == epoch for f in frames)
    await u2.expect_silence()
    # a since that cannot be honoured: recovered false, the stream's position, nothing replayed
    u3 = await connect(session, cluster, 1, user, since=f"1:not-{epoch}")
    assert {k: u3.connected[k] for k in ("recovered", "offset", "epoch")} == {
        "recovered": False, "offset": 6 + live_count, "epoch": epoch}
    reply = await sender.request("private_message", {"user_id": user, "message": "last"}, fid="p-last")
    assert reply["type"] == "ack"
    for client in (u2, u3):
        frame = await client.recv()
        assert (frame["offset"], content(frame)) == (7 + live_count, "last")


# -- concurrency -------------------------------------------------------------------------

async def test_concurrent_publishers_share_one_order_with_contiguous_offsets(
        cluster: Cluster, session: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """5 clients on 3 nodes sending room_message and 2 worker Publishers, all at once: offsets are
    unique and contiguous, every member sees the same order, and the stored history agrees."""
    room, per = "h-conc", 30
    clients = [await connect(session, cluster, i % 3, f"h-conc{i}") for i in range(5)]
    positions = [(await join_since(c, room))[1]["data"] for c in clients]
    epoch, base = positions[0]["epoch"], positions[0]["offset"]
    assert all(p == {"offset": base, "epoch": epoch} for p in positions)

    async def chat(i: int) -> None:
        for k in range(per):
            await clients[i].send(say(room, f"c{i}-{k}"))

    def work(w: int) -> None:
        with Publisher(redis_server.url, key_prefix=PREFIX) as p:
            for k in range(per):
                p.broadcast_to_room(room, {"type": "work", "data": f"w{w}-{k}"})

    await asyncio.gather(*(chat(i) for i in range(5)), asyncio.to_thread(work, 0), asyncio.to_thread(work, 1))
    total = 7 * per
    seen = [await recv_n(c, total) for c in clients]
    order = [(f["offset"], f["epoch"], content(f)) for f in seen[0]]
    assert [o for o, _, _ in order] == list(range(base + 1, base + total + 1))
    assert {e for _, e, _ in order} == {epoch}
    for frames in seen[1:]:
        assert [(f["offset"], f["epoch"], content(f)) for f in frames] == order
    texts = [t for _, _, t in order]
    senders = [f"c{i}" for i in range(5)] + ["w0", "w1"]
    for s in senders:  # each sent once, and per sender in the order sent
        assert [t for t in texts if t.split("-")[0] == s] == [f"{s}-{k}" for k in range(per)]
    for client in clients:
        await client.expect_silence(0.2)
    with Publisher(redis_server.url, key_prefix=PREFIX) as p:
        stored = p.history(room, since=base, limit=1000)
    assert stored.epoch == epoch and stored.offset == base + total
    assert stored.messages == seen[0][-SIZE:]  # as the members received them


# -- bad input -----------------------------------------------------------------------------

BAD_SINCE = [
    "5:abc",  # not an object
    ["offset", 1],
    {"offset": "5", "epoch": "e"},
    {"offset": -1, "epoch": "e"},
    {"offset": 1.5, "epoch": "e"},
    {"offset": True, "epoch": "e"},
    {"offset": 1, "epoch": 7},
    {"offset": 1},
    {"offset": 1, "epoch": "x" * 65},
]


async def test_bad_since_is_refused_and_disturbs_nobody(
        cluster: Cluster, session: aiohttp.ClientSession, pub: Publisher) -> None:
    """Malformed since: bad_message; valid but useless since: recovered false; malformed ?since=:
    400 before the upgrade; ?since= on an anonymous connection: ignored. A witness keeps receiving."""
    room = "h-bad"
    witness = await connect(session, cluster, 0, "h-witness")
    await join_since(witness, room)
    got: list[Any] = []

    async def witness_gets(tag: str) -> None:
        pub.broadcast_to_room(room, {"type": "w", "data": tag})
        frame = await witness.recv()
        got.append(frame["data"])
        assert frame["data"] == tag, frame

    await witness_gets("start")
    epoch = pub.history(room).epoch
    b = await connect(session, cluster, 0, "h-bad-b")
    for i, since in enumerate(BAD_SINCE):
        replay, answer = await join_since(b, room, fid=f"bad{i}", data={"room": room, "since": since})
        assert replay == [] and answer["type"] == "error", (since, answer)
        assert answer["data"]["code"] == "bad_message", (since, answer)
        if i % 4 == 3:
            pong = await b.request("ping", i, fid=f"ping{i}")  # the connection is still fine
            assert (pong["type"], pong["data"]) == ("pong", i)
        await witness_gets(f"after-bad-{i}")

    # valid since that cannot be honoured: recovered false, nothing replayed, the real position
    c = await connect(session, cluster, 1, "h-bad-c")
    for fid, offset, given in (("garbage-epoch", 0, "not-the-epoch"), ("beyond-top", 1000, epoch)):
        top = pub.history(room).offset
        replay, ack = await join_since(c, room, {"offset": top + offset, "epoch": given}, fid=fid)
        assert replay == [], (fid, replay)
        assert ack["data"] == {"recovered": False, "offset": top, "epoch": epoch}, (fid, ack)
        assert (await c.request("leave_room", room, fid=f"leave-{fid}"))["type"] == "ack"
        await witness_gets(f"after-{fid}")
    replay, ack = await join_since(c, "h-bad-unknown", {"offset": 3, "epoch": "abc"}, fid="unknown")
    assert replay == [] and ack["data"]["recovered"] is False and ack["data"]["offset"] == 0
    assert isinstance(ack["data"]["epoch"], str) and ack["data"]["epoch"] not in ("", "abc")

    # ?since= on connect
    url = cluster.nodes[2].ws_url
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    for raw in ("abc", "5", "-1:e", "1.5:e", "x:e", "5:", ":e", "5:" + "x" * 65):
        async with session.get(url, params={"user_id": "h-bad-d", "since": raw}, headers=upgrade) as resp:
            assert resp.status == 400, (raw, resp.status)
            body = await resp.json()
            assert isinstance(body.get("error"), str) and body["error"], (raw, body)
        assert await handshake_status(session, f"{url}?user_id=h-bad-d&since={raw}") == 400, raw
    await witness_gets("after-bad-connects")
    anonymous = await connect(session, cluster, 2, since=f"3:{epoch}")
    assert anonymous.connected["user_id"] is None
    assert not {"recovered", "offset", "epoch"} & set(anonymous.connected), anonymous.connected
    assert (await anonymous.request("ping", "still", fid="p"))["type"] == "pong"

    await witness_gets("end")
    assert got == ["start", *[f"after-bad-{i}" for i in range(len(BAD_SINCE))], "after-garbage-epoch",
                   "after-beyond-top", "after-bad-connects", "end"]
    await witness.expect_silence()


# -- reading history ---------------------------------------------------------------------------

def hubctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "publisher.cli", "--redis-url", url, "--key-prefix", PREFIX,
                           "history", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


async def test_history_reads_http_publisher_and_hubctl_agree(
        cluster: Cluster, session: aiohttp.ClientSession, pub: Publisher, redis_server: RedisServer) -> None:
    """GET /api/rooms/<room>/history and /api/users/<user>/history answer {epoch, offset, messages} with the
    messages as clients got them; Publisher.history and hubctl history give the same; bad since/limit is 400."""
    room, user = "h-read", "h-reader"
    member = await connect(session, cluster, 0, user)
    _, ack = await join_since(member, room)
    epoch = ack["data"]["epoch"]
    user_epoch = member.connected["epoch"]
    for i in range(10):
        pub.broadcast_to_room(room, {"type": "r", "data": f"r-{i}", "metadata": {"i": i}})
    for i in range(4):
        pub.broadcast_to_user(user, {"type": "u", "data": f"u-{i}"})
    received = await recv_n(member, 14)
    room_got = [f for f in received if f.get("room") == room]
    user_got = [f for f in received if f["type"] == "u"]
    assert offsets(room_got) == list(range(1, 11)) and offsets(user_got) == [1, 2, 3, 4]

    async def get(node: int, path: str) -> tuple[int, Any]:
        async with session.get(cluster.nodes[node].url + path) as resp:
            return resp.status, await resp.json()

    status, answer = await get(1, f"/api/rooms/{room}/history?since=3&limit=4")
    assert status == 200
    assert answer == {"epoch": epoch, "offset": 10, "messages": room_got[3:7]}
    assert (await get(2, f"/api/rooms/{room}/history"))[1] == {"epoch": epoch, "offset": 10, "messages": room_got}
    assert (await get(0, f"/api/rooms/{room}/history?since=10"))[1] == {"epoch": epoch, "offset": 10,
                                                                          "messages": []}
    status, user_answer = await get(2, f"/api/users/{user}/history?since=1")
    assert status == 200 and user_answer == {"epoch": user_epoch, "offset": 4, "messages": user_got[1:]}
    for query in ("since=-1", "since=abc", "since=1.5", "limit=0", "limit=-3", "limit=x", "limit=10001"):
        for path in (f"/api/rooms/{room}/history?{query}", f"/api/users/{user}/history?{query}"):
            status, body = await get(0, path)
            assert status == 400 and body["ok"] is False and body["error"]["code"], (path, body)

    assert pub.history(room, since=3, limit=4).to_json() == answer
    assert pub.history(room).to_json() == {"epoch": epoch, "offset": 10, "messages": room_got}
    assert pub.history(user=user, since=1).to_json() == user_answer

    # hubctl --json prints one line, the HTTP API's answer (as every hubctl command does)
    out = hubctl(redis_server.url, room, "--since", "3", "--limit", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == answer
    out = hubctl(redis_server.url, "--user", user, "--since", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == user_answer
    out = hubctl(redis_server.url, room)  # for people: the position, then a row per message
    assert out.returncode == 0, out.stderr
    assert epoch in out.stdout and all(f"r-{i}" in out.stdout for i in range(10)), out.stdout
    out = hubctl(redis_server.url, room, "--user", user)
    assert out.returncode == 2 and "Traceback" not in out.stderr


# -- the TTL ---------------------------------------------------------------------------------

async def test_history_ttl_expiry_means_recovered_false(
        redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """--history-ttl 1: a stream with no publish for a second is gone; since then gets recovered
    false, a new epoch and offsets from 1 again."""
    node = NodeProcess("--redis-url", redis_server.url, "--key-prefix", prefix, "--node-id", "ttl1",
                       "--history-size", "10", "--history-ttl", "1", "--rate", "0").start()
    r = sync_redis(redis_server.url)
    stream, meta = f"{prefix}stream:room:{{ttl}}", f"{prefix}stream:room:{{ttl}}:meta"
    try:
        a = await Client.open(session, f"{node.ws_url}?user_id=ttl-a")
        _, ack = await join_since(a, "ttl")
        epoch = ack["data"]["epoch"]
        for i in range(3):
            await a.send(say("ttl", f"m{i}"))
        frames = await recv_n(a, 3)
        assert offsets(frames) == [1, 2, 3]
        assert r.exists(stream, meta) == 2 and 0 < r.pttl(meta) <= 1000
        await a.close()
        await wait_until(lambda: r.exists(stream, meta) == 0, timeout=5, what="the stream to expire")
        b = await Client.open(session, f"{node.ws_url}?user_id=ttl-a")
        replay, ack = await join_since(b, "ttl", {"offset": 3, "epoch": epoch})
        assert replay == []
        assert ack["data"]["recovered"] is False and ack["data"]["offset"] == 0
        assert ack["data"]["epoch"] != epoch
        await b.send(say("ttl", "fresh"))
        frame = await b.recv()
        assert (frame["offset"], frame["epoch"], content(frame)) == (1, ack["data"]["epoch"], "fresh")
    finally:
        node.stop()


# -- the memory broker -----------------------------------------------------------------------

async def test_memory_broker_recovers_a_join_with_since(session: aiohttp.ClientSession) -> None:
    """A node without --redis-url keeps history too: missed messages replayed on join with since."""
    node = NodeProcess("--node-id", "mem1", "--history-size", "20", "--rate", "0").start()
    try:
        a = await Client.open(session, f"{node.ws_url}?user_id=mem-a")
        b = await Client.open(session, f"{node.ws_url}?user_id=mem-b")
        assert isinstance(a.connected["epoch"], str) and a.connected["offset"] == 0  # its user stream
        _, ack = await join_since(a, "mem")
        epoch = ack["data"]["epoch"]
        await join_since(b, "mem")
        for i in range(3):
            await b.send(say("mem", f"m{i}"))
        assert offsets(await recv_n(a, 3)) == [1, 2, 3]
        await a.close()
        for i in range(3, 8):
            assert (await b.request("room_message", {"room": "mem", "message": f"m{i}"}, fid=i))["type"] == "ack"
        async with session.post(f"{node.url}/broadcast", json={"type": "http", "data": "h", "room": "mem"}) as resp:
            assert resp.status == 202
        a2 = await Client.open(session, f"{node.ws_url}?user_id=mem-a")
        replay, ack = await join_since(a2, "mem", {"offset": 3, "epoch": epoch})
        assert [content(f) for f in replay] == ["m3", "m4", "m5", "m6", "m7", "h"]
        assert offsets(replay) == [4, 5, 6, 7, 8, 9]
        assert ack["data"] == {"recovered": True, "offset": 9, "epoch": epoch}
        await b.send(say("mem", "live"))
        frame = await a2.recv()
        assert (frame["offset"], content(frame)) == (10, "live")
        await a2.expect_silence()
    finally:
        node.stop()
