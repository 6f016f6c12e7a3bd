"""Presence (docs/protocol.md) across real nodes sharing one Redis: who is in a room, and the
join/leave events of --presence-rooms, exactly once per transition whatever ends a connection.

Absence is proven without waiting: a marker published on the room's channel after the actions (and
after Redis shows their effect) reaches every member after any event those actions produced, so the
events a client logged before the marker are all there will ever be.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from publisher import Publisher
from tests.helpers import ROOT, SCALE, Client, Cluster, NodeProcess, RedisServer, deadline, wait_until

PREFIX = f"pres{os.getpid()}:"
PATTERNS = "ev-*,exact-room"
"""--presence-rooms of every node here: a prefix pattern and an exact name."""
HB = 0.5
"""--heartbeat: a dead node is swept within 4 heartbeats."""

Event = tuple[str, str]
"""(event, user_id) of one presence event."""

_marks = itertools.count()


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Three nodes for the whole module; tests use distinct rooms and users."""
    c = Cluster(redis_server.url, PREFIX, n=3, heartbeat=HB, extra=("--presence-rooms", PATTERNS)).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pub(redis_server: RedisServer) -> Iterator[Publisher]:
    with Publisher(redis_server.url, key_prefix=PREFIX) as p:
        yield p


@pytest.fixture
def spare(cluster: Cluster) -> Iterator[Callable[..., NodeProcess]]:
    """Start one more node of the cluster (a node id of the test's own, the same settings) to kill or drain."""
    started: list[NodeProcess] = []

    def start(node_id: str, *more: str) -> NodeProcess:
        args = list(cluster.nodes[0].args)
        args[args.index("--node-id") + 1] = node_id
        node = NodeProcess(*args, *more)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


async def connect(session: aiohttp.ClientSession, node: NodeProcess, user: str | None = None,
                  **kw: Any) -> Client:
    return await Client.open(session, node.ws_url + (f"?user_id={user}" if user else ""), **kw)


async def ask(client: Client, room: str, fid: str) -> dict[str, Any]:
    """The answer to a presence query: the presence or error frame carrying `fid` (events are skipped)."""
    await client.send({"type": "presence", "data": room, "id": fid})
    end = deadline(5)
    while True:
        frame = await client.recv(max(0.01, end - time.monotonic()))
        if frame.get("id") == fid and frame["type"] in ("presence", "error"):
            return frame


async def http_presence(session: aiohttp.ClientSession, node: NodeProcess, room: str) -> dict[str, Any]:
    async with session.get(f"{node.url}/api/rooms/{room}/presence") as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        return await resp.json()  # type: ignore[no-any-return]


def event_of(frame: dict[str, Any]) -> tuple[str, Event] | None:
    """(room, (event, user)) of a presence event frame; None for any other frame (answers carry an id)."""
    if frame["type"] != "presence" or "id" in frame:
        return None
    data = frame["data"]
    assert set(data) == {"event", "user_id"} and data["event"] in ("join", "leave"), frame
    assert isinstance(frame["room"], str) and isinstance(frame.get("timestamp"), int), frame
    return frame["room"], (data["event"], data["user_id"])


def mark(pub: Publisher, *rooms: str) -> dict[str, str]:
    """Publish a marker on each room's channel; room -> marker."""
    tokens = {}
    for room in rooms:
        tokens[room] = f"mark-{next(_marks)}"
        assert pub.broadcast_to_room(room, {"type": "marker", "data": tokens[room]}) >= 1
    return tokens


async def events_before(client: Client, tokens: dict[str, str], timeout: float = 10.0) -> dict[str, list[Event]]:
    """The presence events of each room of `tokens` that the client receives before that room's marker."""
    events: dict[str, list[Event]] = {room: [] for room in tokens}
    waiting = set(tokens)
    end = deadline(timeout)
    while waiting:
        frame = await client.recv(max(0.01, end - time.monotonic()))
        if frame["type"] == "marker" and frame.get("room") in waiting and frame["data"] == tokens[frame["room"]]:
            waiting.discard(frame["room"])
            continue
        found = event_of(frame)
        if found is not None:
            room, event = found
            assert room in waiting, f"an event of {room} after its marker, or of another room: {frame}"
            events[room].append(event)
    return events


async def flush(pub: Publisher, room: str, clients: list[Client]) -> None:
    """Read away what each client has been sent in `room` so far (the events of the set-up)."""
    tokens = mark(pub, room)
    for client in clients:
        await events_before(client, tokens)


async def until_event(client: Client, room: str, want: Event, timeout: float) -> list[Event]:
    """The room's events up to and including `want`; fails after `timeout` (scaled) without it."""
    seen: list[Event] = []
    end = deadline(timeout)
    while want not in seen:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want} within {timeout * SCALE:.1f}s; saw {seen}")
        try:
            frame = await client.recv(left)
        except TimeoutError:
            continue
        found = event_of(frame)
        if found is not None and found[0] == room:
            seen.append(found[1])
    return seen


def presence_is(pub: Publisher, room: str, users: dict[str, int], anonymous: int = 0) -> Callable[[], bool]:
    def check() -> bool:
        now = pub.presence(room)
        return now.users == users and now.anonymous == anonymous
    return check


# -- queries ------------------------------------------------------------------------------

async def answers(session: aiohttp.ClientSession, cluster: Cluster, pub: Publisher, room: str,
                  askers: list[Client]) -> list[tuple[str, dict[str, Any]]]:
    """(who answered, {"users", "anonymous"}) from each asker over WebSocket, each node over HTTP, Publisher and
    `hubctl presence`."""
    got: list[tuple[str, dict[str, Any]]] = []
    for n, client in enumerate(askers):
        frame = await ask(client, room, f"q{n}")
        assert frame["type"] == "presence" and frame["room"] == room and frame["id"] == f"q{n}", frame
        assert set(frame["data"]) == {"users", "anonymous"}, frame
        got.append((f"ws@{client.connected['node']}", frame["data"]))
    for node in cluster.nodes:
        body = await http_presence(session, node, room)
        assert set(body) == {"room", "users", "anonymous"} and body["room"] == room, body
        got.append((f"http@{node.port}", {"users": body["users"], "anonymous": body["anonymous"]}))
    found = pub.presence(room)
    assert found.room == room
    got.append(("publisher", {"users": found.users, "anonymous": found.anonymous}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "publisher.cli", "--redis-url", cluster.redis_url, "--key-prefix", cluster.prefix,
        "presence", room, "--json", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    body = orjson.loads(out)
    assert set(body) == {"room", "users", "anonymous"} and body["room"] == room, body
    got.append(("hubctl", {"users": body["users"], "anonymous": body["anonymous"]}))
    return got


async def test_presence_answers_agree_across_nodes_while_users_come_and_go(
        cluster: Cluster, pub: Publisher, session: aiohttp.ClientSession) -> None:
    """WebSocket (on each node), HTTP (each node), Publisher and hubctl give the same cluster-wide presence: a user's
    2 tabs on 2 nodes count once with 2 connections, anonymous ones are counted apart; it follows leaves,
    closes and joins (in a room without presence events: queries work for every room)."""
    n1, n2, n3 = cluster.nodes
    room = "pq-room"
    alice1, alice2 = await connect(session, n1, "pq-alice"), await connect(session, n2, "pq-alice")
    bob, anon1, anon3 = await connect(session, n3, "pq-bob"), await connect(session, n1), await connect(session, n3)
    for client in (alice1, alice2, bob, anon1, anon3):
        await client.join(room)
    expected = {"users": {"pq-alice": 2, "pq-bob": 1}, "anonymous": 2}
    for who, got in await answers(session, cluster, pub, room, [alice1, alice2, bob]):
        assert got == expected, who

    assert (await bob.request("leave_room", room, "bye"))["type"] == "ack"
    await alice2.close()
    await anon1.close()
    carol = await connect(session, n2, "pq-carol")
    await carol.join(room)
    expected = {"users": {"pq-alice": 1, "pq-carol": 1}, "anonymous": 1}
    await wait_until(presence_is(pub, room, expected["users"], 1), what="the closes to reach Redis")
    for who, got in await answers(session, cluster, pub, room, [alice1, carol, anon3]):
        assert got == expected, who


async def test_presence_query_needs_membership_and_a_valid_room(
        cluster: Cluster, pub: Publisher, session: aiohttp.ClientSession) -> None:
    """A non-member (never joined, or left) asking presence gets not_in_room; an invalid room name gets
    bad_room over WebSocket, 400 bad_room over HTTP and ValueError from Publisher."""
    n1, n2, n3 = cluster.nodes
    room = "nm-room"
    member = await connect(session, n2, "nm-member")
    await member.join(room)
    outsider = await connect(session, n1, "nm-outsider")
    leaver = await connect(session, n3, "nm-leaver")
    await leaver.join(room)
    assert (await leaver.request("leave_room", room, "bye"))["type"] == "ack"
    for client in (outsider, leaver):
        reply = await ask(client, room, "q")
        assert reply["type"] == "error" and reply["id"] == "q" and reply["data"]["code"] == "not_in_room", reply
    reply = await ask(member, room, "q")
    assert reply["type"] == "presence" and reply["data"] == {"users": {"nm-member": 1}, "anonymous": 0}, reply

    for n, bad in enumerate(("a b", "x" * 129, "a{b}", "")):
        reply = await ask(outsider, bad, f"b{n}")
        assert reply["type"] == "error" and reply["data"]["code"] == "bad_room", (bad, reply)
    wrong = []  # every name checked before failing, so one run names every case that is wrong
    for bad in ("x" * 129, "a%7Bb%7D", "a%20b"):
        async with session.get(f"{n1.url}/api/rooms/{bad}/presence") as resp:
            text = await resp.text()
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            body = text
        if resp.status != 400 or not isinstance(body, dict) or body.get("ok") is not False \
                or body.get("error", {}).get("code") != "bad_room":
            wrong.append((bad, resp.status, body))
    assert not wrong, wrong
    with pytest.raises(ValueError):
        pub.presence("a b")


# -- events -------------------------------------------------------------------------------

STORM_USERS = 50
PRE_JOINED = 10
"""Users st-0 .. st-9 are in the room before the observers join: the replay starts from a presence with them."""


def tabs_of(k: int) -> list[int]:
    """The nodes user st-k connects to: one, and a second one for every fifth user."""
    return [k % 3] + ([(k + 1) % 3] if k % 5 == 0 else [])


def ending(k: int) -> str:
    """How user st-k's storm ends: "leave" (leave_room), "close" (disconnect), "half" (one tab closes), "stay"."""
    if k % 3 == 0:
        return "leave"
    if k % 7 == 0:
        return "close"
    return "half" if len(tabs_of(k)) == 2 else "stay"


def final_users(observers: dict[str, int]) -> dict[str, int]:
    users = dict(observers)
    for k in range(STORM_USERS):
        end = ending(k)
        if end in ("stay", "half"):
            users[f"st-{k}"] = len(tabs_of(k)) - (end == "half")
    return users


def expected_single_tab_log(k: int) -> list[Event]:
    """What an observer sees of a one-tab user: its join (unless pre-joined), leave+join, final leave."""
    user = f"st-{k}"
    log = [] if k < PRE_JOINED else [("join", user)]
    if k % 2 == 0:
        log += [("leave", user), ("join", user)]
    if ending(k) in ("leave", "close"):
        log.append(("leave", user))
    return log


async def storm_user(k: int, tabs: list[Client], room: str) -> None:
    """User st-k's part of the storm: its tabs join (unless already in), maybe leave and rejoin, then end."""
    async def tab_life(j: int, tab: Client) -> None:
        if k >= PRE_JOINED:
            await tab.join(room, fid=f"j{k}.{j}")
        if k % 2 == 0:
            assert (await tab.request("leave_room", room, f"l{k}.{j}"))["type"] == "ack"
            await tab.join(room, fid=f"r{k}.{j}")
        end = ending(k)
        if end == "leave":
            assert (await tab.request("leave_room", room, f"e{k}.{j}"))["type"] == "ack"
        elif end == "close" or (end == "half" and j == 0):
            await tab.close()

    await asyncio.gather(*(tab_life(j, tab) for j, tab in enumerate(tabs)))


def replay(start: set[str], log: list[Event], who: str) -> set[str]:
    """The user set after applying `log` to `start`; fails on a join of a present or a leave of an absent user."""
    users = set(start)
    for n, (event, user) in enumerate(log):
        if event == "join":
            assert user not in users, f"{who}: event {n} joins {user}, who is already in"
            users.add(user)
        else:
            assert user in users, f"{who}: event {n} has {user} leave, who is not in"
            users.remove(user)
    return users


async def test_event_logs_replayed_from_the_first_answer_equal_the_final_presence(
        cluster: Cluster, pub: Publisher, session: aiohttp.ClientSession) -> None:
    """50 users join, leave, rejoin, leave and close at once over 3 nodes: each observer's event log, replayed
    from the presence it asked right after joining, equals the final presence (no transition missed or
    doubled; join and leave alternate per user; a one-tab user's log is exactly its own story)."""
    room = "ev-storm"
    nodes = cluster.nodes
    tabs = {k: [await connect(session, nodes[i], f"st-{k}") for i in tabs_of(k)] for k in range(STORM_USERS)}
    for k in range(PRE_JOINED):
        for tab in tabs[k]:
            await tab.join(room)
    observers = [await connect(session, node, f"st-obs-{i}") for i, node in enumerate(nodes)]
    for observer in observers:
        await observer.join(room)
    await flush(pub, room, observers)  # the set-up's events come before the first answer
    before = {f"st-obs-{i}": 1 for i in range(3)}
    start = {**before, **{f"st-{k}": len(tabs_of(k)) for k in range(PRE_JOINED)}}
    first: list[set[str]] = []
    for n, observer in enumerate(observers):
        answer = await ask(observer, room, f"first{n}")
        assert answer["type"] == "presence" and answer["data"] == {"users": start, "anonymous": 0}, answer
        first.append(set(answer["data"]["users"]))

    await asyncio.gather(*(storm_user(k, tabs[k], room) for k in range(STORM_USERS)))
    final = final_users(before)
    await wait_until(presence_is(pub, room, final), timeout=10, what="Redis to hold the final presence")
    tokens = mark(pub, room)
    for n, observer in enumerate(observers):
        log = (await events_before(observer, tokens))[room]
        who = f"observer on {observer.connected['node']}"
        assert replay(first[n], log, who) == set(final), who
        for k in range(STORM_USERS):
            mine = [e for e in log if e[1] == f"st-{k}"]
            if len(tabs_of(k)) == 1:
                assert mine == expected_single_tab_log(k), (who, k, mine)
            else:  # two tabs: whether a transition happened depends on how they interleaved
                assert all(a[0] != b[0] for a, b in zip(mine, mine[1:], strict=False)), (who, k, mine)
        assert not [e for e in log if e[1].startswith("st-obs-")], (who, log)


async def doomed_node(session: aiohttp.ClientSession, cluster: Cluster, spare: Callable[..., NodeProcess],
                      pub: Publisher, name: str, room: str, tag: str, other: int
                      ) -> tuple[NodeProcess, list[Client], list[Client]]:
    """A spare node `name` holding, in `room`: `<tag>-alice`'s only connection, one of `<tag>-bob`'s two (the
    other on live node `other`) and an anonymous one; observers on every live node.

    Returns (node, observers, [alice, bob, bob, anonymous]): the caller holds the clients, or they close.
    """
    victim = spare(name)
    observers = [await connect(session, node, f"{tag}-obs-{i}") for i, node in enumerate(cluster.nodes)]
    for observer in observers:
        await observer.join(room)
    alone = await connect(session, victim, f"{tag}-alice")
    twice = [await connect(session, victim, f"{tag}-bob"), await connect(session, cluster.nodes[other], f"{tag}-bob")]
    anon = await connect(session, victim)
    for client in (alone, *twice, anon):
        await client.join(room)
    await flush(pub, room, observers)
    return victim, observers, [alone, *twice, anon]


async def test_kill_9_gives_exactly_one_leave_within_the_sweep_time(
        cluster: Cluster, pub: Publisher, spare: Callable[..., NodeProcess], session: aiohttp.ClientSession) -> None:
    """kill -9 of a node holding a user's only connection: observers on the other nodes get exactly one leave
    for that user within 4 heartbeats (+1.5 s), and none for a user who still has a connection on a live node."""
    room = "ev-kill"
    # `held`: the clients on the nodes, kept open until the end
    victim, observers, held = await doomed_node(session, cluster, spare, pub, "k1", room, "kl", other=0)

    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.wait()
    logs = [await until_event(o, room, ("leave", "kl-alice"), timeout=4 * HB + 1.5) for o in observers]
    print(f"\n[presence] kill -9: leave seen after {time.monotonic() - killed:.2f}s (heartbeat {HB}s)")
    survivors = {f"kl-obs-{i}": 1 for i in range(3)} | {"kl-bob": 1}
    await wait_until(presence_is(pub, room, survivors), timeout=4 * HB + 1.5, what="the dead node to be swept")
    tokens = mark(pub, room)
    for observer, log in zip(observers, logs, strict=True):
        log += (await events_before(observer, tokens))[room]
        assert log == [("leave", "kl-alice")], (observer.connected["node"], log)


async def test_drain_gives_the_leaves_exactly_once(
        cluster: Cluster, pub: Publisher, spare: Callable[..., NodeProcess], session: aiohttp.ClientSession) -> None:
    """SIGTERM of a node (its clients closed 1001, then its entries removed): observers on the other nodes get
    exactly one leave for the user whose only connection it held, none for a user still connected elsewhere."""
    room = "ev-drain"
    victim, observers, held = await doomed_node(session, cluster, spare, pub, "d1", room, "dr", other=1)
    alone = held[0]

    victim.signal(signal.SIGTERM)
    assert await alone.closed_with(10) == 1001
    logs = [await until_event(o, room, ("leave", "dr-alice"), timeout=10) for o in observers]
    assert victim.wait(15) == 0
    survivors = {f"dr-obs-{i}": 1 for i in range(3)} | {"dr-bob": 1}
    await wait_until(presence_is(pub, room, survivors), what="the drained node's members to be gone")
    tokens = mark(pub, room)
    for observer, log in zip(observers, logs, strict=True):
        log += (await events_before(observer, tokens))[room]
        assert log == [("leave", "dr-alice")], (observer.connected["node"], log)


async def test_ping_timeout_gives_exactly_one_leave(
        cluster: Cluster, pub: Publisher, spare: Callable[..., NodeProcess], session: aiohttp.ClientSession) -> None:
    """A client that stops answering pings is dropped by its node: observers get exactly one leave for it."""
    room = "ev-ping"
    node = spare("p1", "--ping-interval", "0.3", "--ping-timeout", "0.3")
    observers = [await connect(session, n, f"pt-obs-{i}") for i, n in enumerate(cluster.nodes[:2])]
    for observer in observers:
        await observer.join(room)
    mute = await connect(session, node, "pt-alice", autoping=False)
    await mute.send({"type": "join_room", "data": room, "id": "j"})
    while True:  # this client answers no ping; a ping may already come before the ack
        msg = await mute.ws.receive(timeout=5 * SCALE)
        if msg.type is aiohttp.WSMsgType.TEXT and orjson.loads(msg.data).get("id") == "j":
            assert orjson.loads(msg.data)["type"] == "ack", msg.data
            break
    for observer in observers:
        await until_event(observer, room, ("join", "pt-alice"), timeout=5)
    logs = [await until_event(o, room, ("leave", "pt-alice"), timeout=5) for o in observers]
    await wait_until(presence_is(pub, room, {"pt-obs-0": 1, "pt-obs-1": 1}), what="the dropped client to be gone")
    tokens = mark(pub, room)
    for observer, log in zip(observers, logs, strict=True):
        log += (await events_before(observer, tokens))[room]
        assert [e for e in log if e[1] == "pt-alice"] == [("leave", "pt-alice")], log


async def test_rooms_not_covered_get_no_events(cluster: Cluster, pub: Publisher,
                                               session: aiohttp.ClientSession) -> None:
    """Joins and leaves in rooms outside --presence-rooms (no match; a longer name than an exact pattern) give
    no event; the same in rooms it covers (prefix*, an exact name) give one join and one leave."""
    n1, n2, _ = cluster.nodes
    covered, plain = ["ev-np", "exact-room"], ["np-plain", "exact-room-2"]
    observer = await connect(session, n1, "np-obs")
    for room in covered + plain:
        await observer.join(room)
    await events_before(observer, mark(pub, *covered, *plain))  # the observer's own joins come before
    mover = await connect(session, n2, "np-mover")
    for room in covered + plain:
        await mover.join(room)
        assert (await mover.request("leave_room", room, f"l-{room}"))["type"] == "ack"
    events = await events_before(observer, mark(pub, *covered, *plain))
    for room in covered:
        assert events[room] == [("join", "np-mover"), ("leave", "np-mover")], (room, events[room])
    for room in plain:
        assert events[room] == [], (room, events[room])


async def test_anonymous_connections_make_no_events(cluster: Cluster, pub: Publisher,
                                                    session: aiohttp.ClientSession) -> None:
    """Anonymous connections joining, leaving and closing in a presence room give no event; a user after
    them gives its join."""
    n1, n2, n3 = cluster.nodes
    room = "ev-anon"
    observers = [await connect(session, n1, "an-obs-1"), await connect(session, n3, "an-obs-3")]
    for observer in observers:
        await observer.join(room)
    await flush(pub, room, observers)
    stays, goes = await connect(session, n3), await connect(session, n2)
    await stays.join(room)
    await goes.join(room)
    assert (await goes.request("leave_room", room, "l"))["type"] == "ack"
    await goes.join(room, fid="again")
    await goes.close()
    user = await connect(session, n2, "an-user")
    await user.join(room)
    await wait_until(presence_is(pub, room, {"an-obs-1": 1, "an-obs-3": 1, "an-user": 1}, anonymous=1),
                     what="the anonymous close to reach Redis")
    tokens = mark(pub, room)
    for observer in observers:
        assert (await events_before(observer, tokens))[room] == [("join", "an-user")]
