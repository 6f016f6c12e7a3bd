"""Publisher, AsyncPublisher and hubctl against a real redis-server.

Plain redis subscribers stand in for nodes: PUBLISH counts them exactly as
it counts nodes. Inspection reads keys written by hand in the docs/redis.md
layout, so these tests pin the layout, not whatever the node happens to do.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import publisher.control
from publisher import AsyncPublisher, Publisher, Target
from publisher.control import Command, command_of, pack_command
from publisher.envelope import Envelope, unpack
from publisher.inspect import PRESENCE_SCRIPT, Member, Presence
from publisher.keys import Keys
from tests.helpers import ROOT, RedisServer, deadline, free_port


class Listener:
    """A plain Redis subscriber (one connection, like one node) that decodes envelopes."""

    def __init__(self, url: str, *channels: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(*channels)
        for _ in channels:  # PUBLISH only counts a subscription Redis has confirmed
            assert self.next(5.0)["type"] == "subscribe"

    def next(self, timeout: float) -> dict[str, Any]:
        end = deadline(timeout)
        while time.monotonic() < end:
            msg = self.pubsub.get_message(timeout=max(0.01, end - time.monotonic()))
            if msg is not None:
                return msg
        raise AssertionError("timed out waiting for a pub/sub message")

    def take(self, n: int, timeout: float = 10.0) -> list[tuple[str, Envelope]]:
        """The next n publications as (channel, envelope), failing after the deadline."""
        end = deadline(timeout)
        got = []
        for _ in range(n):
            msg = self.next(max(0.01, end - time.monotonic()))
            got.append((msg["channel"].decode(), unpack(msg["data"])))
        return got

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def listeners(redis_server: RedisServer) -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for lis in made:
        lis.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def listen(listeners: list[Listener], url: str, *channels: str) -> Listener:
    lis = Listener(url, *channels)
    listeners.append(lis)
    return lis


# -- publishing -------------------------------------------------------------------

def test_each_kind_reaches_its_channel_and_counts_subscribers(
        redis_server: RedisServer, prefix: str, keys: Keys, listeners: list[Listener]) -> None:
    """all/room/user publishes land on hub:all, hub:room:{R}, hub:user:{U} and return the subscriber count."""
    url = redis_server.url
    nodes = [listen(listeners, url, keys.all, keys.room_channel("r1")) for _ in range(3)]
    user_node = listen(listeners, url, keys.user_channel("u1"))
    with Publisher(url, key_prefix=prefix, origin_id="w1") as pub:
        assert pub.broadcast_to_all({"type": "a"}) == 3
        assert pub.broadcast_to_room("r1", {"type": "b", "data": [1]}) == 3
        assert pub.broadcast_to_user("u1", {"type": "c"}) == 1
        assert pub.broadcast_to_room("nobody", {"type": "d"}) == 0
    for node in nodes:
        got = node.take(2)
        assert [(c, e.msg.type) for c, e in got] == [(keys.all, "a"), (keys.room_channel("r1"), "b")]
        assert all(e.origin == "pub:w1" for _, e in got)
    [(channel, env)] = user_node.take(1)
    assert channel == keys.user_channel("u1") and env.msg.type == "c"


async def test_async_kinds_and_counts(redis_server: RedisServer, prefix: str, keys: Keys,
                                      listeners: list[Listener]) -> None:
    """AsyncPublisher returns the same node counts on the same channels."""
    url = redis_server.url
    a = listen(listeners, url, keys.all, keys.user_channel("u1"))
    listen(listeners, url, keys.all, keys.room_channel("r1"))
    async with AsyncPublisher(url, key_prefix=prefix) as pub:
        assert await pub.broadcast_to_all({"type": "a"}) == 2
        assert await pub.broadcast_to_room("r1", {"type": "b"}) == 1
        assert await pub.broadcast_to_user("u1", {"type": "c"}) == 1
    assert [c for c, _ in a.take(2)] == [keys.all, keys.user_channel("u1")]


def test_thousand_messages_keep_their_order(redis_server: RedisServer, prefix: str, keys: Keys,
                                            listeners: list[Listener]) -> None:
    """1,000 publishes from one Publisher arrive at a subscriber in publish order."""
    lis = listen(listeners, redis_server.url, keys.room_channel("r"))
    with Publisher(redis_server.url, key_prefix=prefix) as pub:
        for i in range(1000):
            pub.broadcast_to_room("r", {"type": "n", "data": i})
    assert [e.msg.data for _, e in lis.take(1000)] == list(range(1000))


async def test_thousand_concurrent_async_publishes_keep_call_order(
        redis_server: RedisServer, prefix: str, keys: Keys) -> None:
    """1,000 concurrent AsyncPublisher calls leave in the order they were made."""
    sub = aioredis.Redis.from_url(redis_server.url)
    pubsub = sub.pubsub()
    await pubsub.subscribe(keys.room_channel("r"))
    try:
        confirmed = await pubsub.get_message(timeout=5.0)  # PUBLISH counts only confirmed subscriptions
        assert confirmed is not None and confirmed["type"] == "subscribe"
        async with AsyncPublisher(redis_server.url, key_prefix=prefix) as pub:
            counts = await asyncio.gather(
                *(pub.broadcast_to_room("r", {"type": "n", "data": i}) for i in range(1000)))
        assert counts == [1] * 1000
        seen: list[int] = []
        end = deadline(10)
        while len(seen) < 1000 and time.monotonic() < end:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None:
                seen.append(unpack(msg["data"]).msg.data)
        assert seen == list(range(1000))
    finally:
        await pubsub.aclose()
        await sub.aclose()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_publish_many_pipelines_in_order(redis_server: RedisServer, prefix: str, keys: Keys,
                                               listeners: list[Listener], kind: str) -> None:
    """publish_many sends a mixed batch (more than one pipeline) in order, one count per item."""
    lis = listen(listeners, redis_server.url, keys.all, keys.room_channel("r"), keys.user_channel("u"))
    targets = [Target("room", "r"), Target("user", "u"), Target("all"), Target("room", "empty")]
    items = [(targets[i % 4], {"type": "n", "data": i}) for i in range(2500)]
    if kind == "sync":
        with Publisher(redis_server.url, key_prefix=prefix) as pub:
            counts = pub.publish_many(items)
    else:
        async with AsyncPublisher(redis_server.url, key_prefix=prefix) as apub:
            counts = await apub.publish_many(items)
    assert counts == [1, 1, 1, 0] * 625
    got = lis.take(1875)
    assert [e.msg.data for _, e in got] == [i for i in range(2500) if i % 4 != 3]
    assert got[0][0] == keys.room_channel("r") and got[1][0] == keys.user_channel("u")


def test_every_command_has_a_timeout() -> None:
    """A Redis that accepts but never answers makes a publish fail within the timeout, not hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        with Publisher(url, timeout=0.3) as pub, pytest.raises(redis.TimeoutError):
            pub.broadcast_to_all({"type": "t"})
        assert time.monotonic() - started < 5


# -- inspection ---------------------------------------------------------------------

def write_layout(raw: redis.Redis, keys: Keys) -> None:
    """Two live nodes (one without heartbeat_at), one expired node, two rooms (and an emptied one), online hashes."""
    now = int(time.time() * 1000)
    raw.zadd(keys.nodes, {"n1": now + 60_000, "eu:n2": now + 60_000, "dead": now - 1_000})
    raw.hset(keys.node("n1"), mapping={"clients": 3, "started_at": time.time() - 90,
                                       "address": "10.0.0.1:8080", "version": "0.1.0",
                                       "heartbeat_at": now - 1_200})
    raw.hset(keys.node("eu:n2"), mapping={"clients": 2, "started_at": time.time(), "version": "0.1.0"})
    raw.hset(keys.node("dead"), mapping={"clients": 50})
    raw.sadd(keys.node_rooms("n1"), "lobby", "ops", "emptied")  # an index may list a room emptied since
    raw.sadd(keys.node_rooms("eu:n2"), "lobby")
    raw.hset(keys.members("lobby"), mapping={"n1:1": "alice", "n1:10": "", "eu:n2:2": "bob"})
    raw.hset(keys.members("ops"), mapping={"n1:3": "alice"})
    raw.hset(keys.online("alice"), mapping={"n1:1": "n1", "n1:3": "n1"})
    raw.hset(keys.online("bob"), mapping={"eu:n2:2": "eu:n2"})


LOBBY = [Member("eu:n2:2", "bob", "eu:n2"), Member("n1:1", "alice", "n1"), Member("n1:10", None, "n1")]


def test_inspection_reads_the_documented_layout(redis_server: RedisServer, prefix: str, keys: Keys,
                                                raw: redis.Redis) -> None:
    """rooms, members, counts, nodes and online come straight from the docs/redis.md keys."""
    write_layout(raw, keys)
    with Publisher(redis_server.url, key_prefix=prefix) as pub:
        assert pub.rooms() == {"lobby": 3, "ops": 1}
        assert pub.room_members("lobby") == LOBBY
        assert pub.room_members("nowhere") == []
        assert (pub.room_count(), pub.client_count()) == (2, 5)
        assert pub.stats().to_json() == {"clients": 5, "rooms": 2, "nodes": 2}
        assert (pub.user_online("alice"), pub.user_online("bob"), pub.user_online("carol")) == (2, 1, 0)
        n2, n1 = pub.nodes()
    assert (n1.id, n1.clients, n1.address, n1.version) == ("n1", 3, "10.0.0.1:8080", "0.1.0")
    assert n1.heartbeat_age is not None and 1.0 <= n1.heartbeat_age < 30
    assert (n2.id, n2.clients, n2.heartbeat_age, n2.address) == ("eu:n2", 2, None, None)
    assert 30 < n2.expires_in <= 60


async def test_async_inspection_matches_sync(redis_server: RedisServer, prefix: str, keys: Keys,
                                             raw: redis.Redis) -> None:
    """AsyncPublisher's inspection answers equal Publisher's."""
    write_layout(raw, keys)
    async with AsyncPublisher(redis_server.url, key_prefix=prefix) as pub:
        assert await pub.rooms() == {"lobby": 3, "ops": 1}
        assert await pub.room_members("lobby") == LOBBY
        assert (await pub.stats()).to_json() == {"clients": 5, "rooms": 2, "nodes": 2}
        assert [n.id for n in await pub.nodes()] == ["eu:n2", "n1"]
        assert await pub.user_online("alice") == 2


def test_big_room_is_read_completely(redis_server: RedisServer, prefix: str, keys: Keys,
                                     raw: redis.Redis) -> None:
    """HSCAN pages through a room of 2,500 members and returns each exactly once."""
    raw.hset(keys.members("big"), mapping={f"n{i % 3}:{i}": f"u{i}" for i in range(2500)})
    own = redis.Redis.from_url(redis_server.url)  # a caller's client, replies as bytes
    with Publisher(key_prefix=prefix, client=own) as pub:
        members = pub.room_members("big")
    own.close()
    assert len(members) == 2500 and len({m.conn_id for m in members}) == 2500
    assert members[0] == Member("n0:0", "u0", "n0")


# -- hubctl ----------------------------------------------------------------------------

def hubctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "publisher.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


def hubctl_json(url: str, prefix: str, *args: str) -> Any:
    result = hubctl("--redis-url", url, "--key-prefix", prefix, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_hubctl_inspection_commands(redis_server: RedisServer, prefix: str, keys: Keys,
                                    raw: redis.Redis) -> None:
    """rooms, members, nodes and stats print the HTTP API's JSON shapes from the keys."""
    write_layout(raw, keys)
    url = redis_server.url
    assert hubctl_json(url, prefix, "rooms") == {"rooms": {"lobby": 3, "ops": 1}}
    assert hubctl_json(url, prefix, "members", "lobby") == {"room": "lobby", "members": [
        {"conn_id": "eu:n2:2", "user_id": "bob", "node": "eu:n2"},
        {"conn_id": "n1:1", "user_id": "alice", "node": "n1"},
        {"conn_id": "n1:10", "user_id": None, "node": "n1"}]}
    assert hubctl_json(url, prefix, "stats") == {"clients": 5, "rooms": 2, "nodes": 2}
    nodes = hubctl_json(url, prefix, "nodes")["nodes"]
    assert [(n["id"], n["clients"]) for n in nodes] == [("eu:n2", 2), ("n1", 3)]
    assert nodes[0]["heartbeat_age"] is None and nodes[1]["heartbeat_age"] >= 1.0


def test_hubctl_human_output_and_environment(redis_server: RedisServer, prefix: str, keys: Keys,
                                             raw: redis.Redis) -> None:
    """Without --json, tables are aligned; HUB_REDIS_URL and HUB_KEY_PREFIX replace the flags."""
    write_layout(raw, keys)
    env = {**os.environ, "HUB_REDIS_URL": redis_server.url, "HUB_KEY_PREFIX": prefix}
    stats = hubctl("stats", env=env)
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.splitlines() == ["clients  5", "rooms    2", "nodes    2"]
    rooms = hubctl("rooms", env=env).stdout.splitlines()
    assert rooms == ["ROOM   MEMBERS", "lobby        3", "ops          1"]


@pytest.mark.parametrize(("flags", "channel_of"), [
    (["--all"], lambda k: k.all),
    (["--room", "r1"], lambda k: k.room_channel("r1")),
    (["--user", "u1"], lambda k: k.user_channel("u1")),
])
def test_hubctl_publish(redis_server: RedisServer, prefix: str, keys: Keys, listeners: list[Listener],
                        flags: list[str], channel_of: Any) -> None:
    """hubctl publish sends a validated message to the chosen target and reports the node count."""
    channel = channel_of(keys)
    lis = [listen(listeners, redis_server.url, channel) for _ in range(2)]
    out = hubctl_json(redis_server.url, prefix, "publish", *flags, "--type", "notice",
                      "--data", '{"text": "hi"}', "--metadata", '{"by": "ops"}')
    assert out == {"channel": channel, "nodes": 2}
    [(got_channel, env)] = lis[0].take(1)
    assert got_channel == channel and env.origin.startswith("pub:hubctl-")
    assert (env.msg.type, env.msg.data, env.msg.metadata) == ("notice", {"text": "hi"}, {"by": "ops"})
    human = hubctl("--redis-url", redis_server.url, "--key-prefix", prefix, "publish", *flags, "--type", "t")
    assert human.stdout.strip() == f"published on {channel}: 2 nodes took it"


@pytest.mark.parametrize(("args", "status", "says"), [
    (["--redis-url", "foo://nowhere", "stats"], 2, "bad Redis URL"),
    (["--redis-url", "redis://127.0.0.1:notaport/0", "rooms"], 2, "bad Redis URL"),
    (["--redis-url", "redis://u:pw@127.0.0.1:{closed}/0", "stats"], 1, "cannot reach Redis"),
    (["--redis-url", "redis://127.0.0.1:{closed}/0", "publish", "--all", "--type", "t"], 1, "cannot reach"),
    (["--redis-url", "redis://127.0.0.1:{closed}/0", "publish", "--all", "--type", "t", "--data", "{x"], 2,
     "--data is not valid JSON"),
    (["--redis-url", "redis://127.0.0.1:{closed}/0", "publish", "--room", "r", "--type", "t",
      "--metadata", "[1]"], 2, "'metadata' must be an object"),
    (["--redis-url", "redis://127.0.0.1:{closed}/0", "members", "a{b}"], 2, "room name"),
])
def test_hubctl_errors_are_one_line(args: list[str], status: int, says: str) -> None:
    """Bad URL, unreachable Redis, bad JSON or a bad name: one stderr line, non-zero exit, no traceback."""
    port = str(free_port())  # free_port closes its probe: nothing listens there
    result = hubctl(*(a.replace("{closed}", port) for a in args))
    assert result.returncode == status
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("hubctl: error: ") and says in result.stderr
    assert "pw" not in result.stderr


def test_hubctl_times_out_on_a_silent_server() -> None:
    """A server that never answers gives a one-line timeout error, exit 1."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        result = hubctl("--redis-url", url, "--timeout", "0.3", "stats")
    assert result.returncode == 1
    assert result.stderr.strip() == f"hubctl: error: Redis at {url} did not answer within 0.3s"


# -- history (docs/protocol.md) ------------------------------------------------------

def test_history_script_adds_exactly_the_bytes_the_embedded_broker_adds(
        redis_server: RedisServer, prefix: str, keys: Keys, listeners: list[Listener]) -> None:
    """lua/publish.lua and publisher.history.splice build the same envelope, byte for byte (fixmap and map16)."""
    import msgpack

    from publisher.history import PUBLISH_SCRIPT, splice

    room = listen(listeners, redis_server.url, keys.room_channel("h"))
    client = redis.Redis.from_url(redis_server.url)
    script = client.register_script(PUBLISH_SCRIPT.text)
    small = msgpack.packb({"v": 1, "id": "a", "origin": "o", "msg": {"type": "t"}})
    large = msgpack.packb({"v": 1, "id": "b", "origin": "o", "msg": {"type": "t"}, **{f"x{i}": i for i in range(14)}})
    for payload, mid in ((small, "a"), (large, "b")):
        stream_keys = [keys.stream("room", "h"), keys.stream_meta("room", "h"), keys.stream_ids("room", "h")]
        offset, epoch = script(keys=stream_keys,
                               args=[keys.room_channel("h"), payload, mid, 10, 60, "ep0"])[1:]
        got = room.next(5.0)["data"]
        assert got == splice(payload, offset, epoch.decode())
    client.close()


def test_publisher_with_history_creates_the_stream_and_a_publisher_without_appends_to_it(
        redis_server: RedisServer, prefix: str, raw: redis.Redis) -> None:
    """history_size creates the stream; any publisher then appends (offsets never skip); history() reads it."""
    with Publisher(redis_server.url, key_prefix=prefix, history_size=3, history_ttl=30) as with_history, \
            Publisher(redis_server.url, key_prefix=prefix, history_size=0) as without:
        without.broadcast_to_room("h", {"type": "t", "data": 0})  # no stream yet: no history
        with_history.broadcast_to_room("h", {"type": "t", "data": 1})
        without.broadcast_to_room("h", {"type": "t", "data": 2})
        with_history.broadcast_to_room("h", {"type": "t", "data": 3})
        without.broadcast_to_room("h", {"type": "t", "data": 4})
        found = without.history("h")
        assert found.offset == 4 and [m["offset"] for m in found.messages] == [2, 3, 4]
        assert [m["data"] for m in found.messages] == [2, 3, 4] and all(m["room"] == "h" for m in found.messages)
        assert without.history("h", since=3).messages[0]["data"] == 4
        assert 0 < raw.ttl(f"{prefix}stream:room:{{h}}") <= 30
        assert without.history(user="nobody").epoch is None
        with pytest.raises(ValueError):
            without.history("h", user="u")


# -- control and presence (docs/protocol.md) ----------------------------------

CONTROL_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], Command]] = [
    ("disconnect_user", ("alice",), {"reason": "bye", "reconnect": True},
     Command("disconnect", user="alice", reason="bye", reconnect=True)),
    ("join_user", ("alice", "lobby"), {}, Command("join", user="alice", room="lobby")),
    ("leave_user", ("alice", "lobby"), {}, Command("leave", user="alice", room="lobby")),
    ("disconnect_connection", ("eu:n2:7",), {"reason": "one"}, Command("disconnect", conn="eu:n2:7", reason="one")),
    ("disconnect_user", ("ghost",), {}, Command("disconnect", user="ghost")),
    ("disconnect_connection", ("n9:1",), {}, Command("disconnect", conn="n9:1")),
]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_control_commands_reach_exactly_the_nodes_that_hold_the_target(
        redis_server: RedisServer, prefix: str, keys: Keys, listeners: list[Listener],
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Each command lands, byte for byte as packed, on the user's or owning node's channel; the call answers
    how many subscribers took it (2, 1, or 0 for a user or node nobody holds)."""
    monkeypatch.setattr(publisher.control, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.5))
    url = redis_server.url
    alice = [listen(listeners, url, keys.user_channel("alice")) for _ in range(2)]
    node = listen(listeners, url, keys.node_channel("eu:n2"))
    if kind == "sync":
        with Publisher(url, key_prefix=prefix, origin_id="w1") as pub:
            counts = [getattr(pub, method)(*args, **kwargs) for method, args, kwargs, _ in CONTROL_CALLS]
    else:
        async with AsyncPublisher(url, key_prefix=prefix, origin_id="w1") as apub:
            counts = [await getattr(apub, method)(*args, **kwargs) for method, args, kwargs, _ in CONTROL_CALLS]
    assert counts == [2, 2, 2, 1, 0, 0]
    commands = [command for *_, command in CONTROL_CALLS]
    received = [[lis.next(5.0) for _ in range(3)] for lis in alice] + [[node.next(5.0)]]
    for got, expected in zip(received, [commands[:3], commands[:3], commands[3:4]], strict=True):
        for msg, command in zip(got, expected, strict=True):
            envelope = unpack(msg["data"])
            assert msg["channel"].decode() == command.channel(keys)
            assert msg["data"] == pack_command(command, "pub:w1", envelope.id)[1]
            assert command_of(envelope.control) == command
    assert len({unpack(m["data"]).id for m in received[0] + received[2]}) == 4  # one envelope id per command


def write_presence(raw: redis.Redis, keys: Keys) -> None:
    """lobby: alice on two nodes, bob once, two anonymous connections, a stale zero count for carol."""
    raw.hset(keys.presence("lobby"), mapping={"alice": 2, "bob": 1, "carol": 0})
    raw.hset(keys.members("lobby"), mapping={"n1:1": "alice", "eu:n2:2": "alice", "n1:3": "bob", "n1:10": "",
                                             "eu:n2:5": ""})


LOBBY_PRESENCE = Presence("lobby", {"alice": 2, "bob": 1}, 2)


def test_presence_reads_the_presence_and_members_hashes(redis_server: RedisServer, prefix: str, keys: Keys,
                                                        raw: redis.Redis) -> None:
    """presence() gives users with their connection counts and anonymous = HLEN(members) - sum(users)."""
    write_presence(raw, keys)
    with Publisher(redis_server.url, key_prefix=prefix) as pub:
        assert pub.presence("lobby") == LOBBY_PRESENCE
        assert pub.presence("nowhere") == Presence("nowhere", {}, 0)
        raw.hset(keys.members("lobby"), "n1:11", "")  # one more anonymous connection
        assert pub.presence("lobby").anonymous == 3
    own = redis.Redis.from_url(redis_server.url)  # a caller's client, replies as bytes
    with Publisher(key_prefix=prefix, client=own) as pub:
        assert pub.presence("lobby") == Presence("lobby", {"alice": 2, "bob": 1}, 3)
    own.close()


async def test_async_presence_matches_sync(redis_server: RedisServer, prefix: str, keys: Keys,
                                           raw: redis.Redis) -> None:
    """AsyncPublisher.presence answers what Publisher.presence does."""
    write_presence(raw, keys)
    async with AsyncPublisher(redis_server.url, key_prefix=prefix) as pub:
        assert await pub.presence("lobby") == LOBBY_PRESENCE
        assert (await pub.presence("lobby")).to_json() == {"room": "lobby", "users": {"alice": 2, "bob": 1},
                                                          "anonymous": 2}
        assert await pub.presence("nowhere") == Presence("nowhere", {}, 0)


def test_hubctl_presence(redis_server: RedisServer, prefix: str, keys: Keys, raw: redis.Redis) -> None:
    """hubctl presence ROOM prints a USER / CONNECTIONS table and the anonymous count; --json the API's shape."""
    write_presence(raw, keys)
    url = redis_server.url
    assert hubctl_json(url, prefix, "presence", "lobby") == LOBBY_PRESENCE.to_json()
    human = hubctl("--redis-url", url, "--key-prefix", prefix, "presence", "lobby")
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines() == ["USER   CONNECTIONS", "alice            2", "bob              1",
                                         "anonymous: 2"]
    empty = hubctl("--redis-url", url, "--key-prefix", prefix, "presence", "nowhere")
    assert empty.stdout.splitlines() == ["no users in nowhere", "anonymous: 0"]


def test_hubctl_control_commands(redis_server: RedisServer, prefix: str, keys: Keys,
                                 listeners: list[Listener]) -> None:
    """disconnect, join and leave send the command and print how many nodes took it; 0 for an unknown user."""
    url = redis_server.url
    user = listen(listeners, url, keys.user_channel("alice"))
    node = listen(listeners, url, keys.node_channel("n1"))
    assert hubctl_json(url, prefix, "disconnect", "alice", "--reason", "maintenance", "--reconnect") == {
        "op": "disconnect", "user": "alice", "nodes": 1}
    assert hubctl_json(url, prefix, "join", "alice", "lobby") == {"op": "join", "user": "alice", "room": "lobby",
                                                                   "nodes": 1}
    assert hubctl_json(url, prefix, "leave", "alice", "lobby") == {"op": "leave", "user": "alice",
                                                                    "room": "lobby", "nodes": 1}
    assert hubctl_json(url, prefix, "disconnect", "--conn", "n1:4") == {"op": "disconnect", "conn": "n1:4",
                                                                         "nodes": 1}
    assert hubctl_json(url, prefix, "disconnect", "ghost") == {"op": "disconnect", "user": "ghost", "nodes": 0}
    got = [unpack(msg["data"]) for msg in (user.next(5.0), user.next(5.0), user.next(5.0), node.next(5.0))]
    assert [command_of(env.control) for env in got] == [
        Command("disconnect", user="alice", reason="maintenance", reconnect=True),
        Command("join", user="alice", room="lobby"), Command("leave", user="alice", room="lobby"),
        Command("disconnect", conn="n1:4")]
    assert all(env.origin.startswith("pub:hubctl-") for env in got)
    base = ["--redis-url", url, "--key-prefix", prefix]
    for args, line in ((["disconnect", "alice"], "disconnect user alice: 1 node took it"),
                       (["disconnect", "--conn", "n1:5", "--reason", "x"],
                        "disconnect connection n1:5: 1 node took it"),
                       (["join", "alice", "lobby"], "join user alice to room lobby: 1 node took it"),
                       (["leave", "alice", "lobby"], "leave user alice from room lobby: 1 node took it"),
                       (["join", "ghost", "lobby"], "join user ghost to room lobby: 0 nodes took it")):
        human = hubctl(*base, *args)
        assert (human.returncode, human.stdout, human.stderr) == (0, line + "\n", ""), args


@pytest.mark.parametrize(("args", "says"), [
    (["disconnect"], "exactly one of USER and --conn"),
    (["disconnect", "alice", "--conn", "n1:1"], "exactly one of USER and --conn"),
    (["disconnect", "a b"], "user id"),
    (["disconnect", "a{b}", "--reconnect"], "user id"),
    (["disconnect", "--conn", "n1"], "connection id"),
    (["disconnect", "alice", "--reason", "x" * 300], "reason"),
    (["join", "alice", "a b"], "room name"),
    (["join", "a b", "lobby"], "user id"),
    (["leave", "alice", "{r}"], "room name"),
    (["join", "alice"], "required: ROOM"),
    (["presence", "a b"], "room name"),
])
def test_hubctl_control_usage_errors(args: list[str], says: str) -> None:
    """A bad user id, room, connection id or reason, or a wrong USER/--conn choice: exit 2, one line, before
    Redis is asked (nothing listens on the URL's port, which would exit 1)."""
    result = hubctl("--redis-url", f"redis://127.0.0.1:{free_port()}/0", *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("hubctl") and says in result.stderr, result.stderr


def test_hubctl_script_prints_the_presence_script() -> None:
    """`hubctl script presence` prints presence.lua, so a publisher in another language can run the same read."""
    result = hubctl("script", "presence")
    assert result.returncode == 0 and result.stdout == PRESENCE_SCRIPT.text
    data = json.loads(hubctl("script", "presence", "--json").stdout)
    assert data == {"name": "presence", "sha": PRESENCE_SCRIPT.sha, "text": PRESENCE_SCRIPT.text}
