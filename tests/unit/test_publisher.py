"""The publisher package without a real Redis: validation, packing, keys, queries, recorder."""

from __future__ import annotations

import time
import types
from typing import Any

import fakeredis
import msgpack
import pytest
import redis

import publisher.control
import publisher.envelope
from publisher import AsyncPublisher, Publisher, RecordingPublisher, Target
from publisher import inspect as hub_inspect
from publisher.cli import redact, table
from publisher.control import Command, command_of, pack_command
from publisher.core import default_prefix, default_url, make_origin, prepare
from publisher.envelope import unpack
from publisher.keys import Keys
from publisher.message import Message
from publisher.query import Call, drive
from publisher.targets import envelope_for


class Spy:
    """Wraps a client and notes every attribute the publisher touches on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(name)
        return getattr(self.inner, name)


class Capture:
    """A fakeredis server with a pattern subscriber that collects every publication."""

    def __init__(self) -> None:
        self.server = fakeredis.FakeServer()
        self.sub = fakeredis.FakeRedis(server=self.server).pubsub()
        self.sub.psubscribe("*")
        assert self.sub.get_message(timeout=1)["type"] == "psubscribe"

    def messages(self) -> list[tuple[str, bytes]]:
        out = []
        while (m := self.sub.get_message(timeout=0.01)) is not None:
            out.append((m["channel"].decode(), m["data"]))
        return out


BAD_CALLS = [
    ("broadcast_to_room", ("a b", {"type": "t"})),
    ("broadcast_to_room", ("", {"type": "t"})),
    ("broadcast_to_room", ("{x}", {"type": "t"})),
    ("broadcast_to_room", ("r" * 129, {"type": "t"})),
    ("broadcast_to_user", ("u\n1", {"type": "t"})),
    ("broadcast_to_user", (7, {"type": "t"})),
    ("broadcast_to_all", ({"data": 1},)),
    ("broadcast_to_all", ({"type": ""},)),
    ("broadcast_to_all", ("hello",)),
    ("broadcast_to_all", (["type", "t"],)),
    ("broadcast_to_all", ({"type": "t", "metadata": [1]},)),
    ("broadcast_to_all", ({"type": "t", "room": "a b"},)),
    ("broadcast_to_all", ({"type": "t", "data": {1, 2}},)),
    ("publish_many", ([(Target("all"), {"type": "ok"}), (Target("all"), {"data": 1})],)),
    ("publish_many", ([("room", {"type": "t"})],)),
    ("publish_many", ([Target("all")],)),
]


@pytest.mark.parametrize(("method", "args"), BAD_CALLS)
def test_sync_rejects_bad_input_before_sending(method: str, args: tuple[Any, ...]) -> None:
    """A bad room, user id, type, shape or value raises ValueError and issues no Redis command."""
    spy = Spy(fakeredis.FakeRedis())
    with Publisher(client=spy) as pub:  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            getattr(pub, method)(*args)
        assert spy.touched == []
        assert pub.broadcast_to_all({"type": "ok"}) == 0  # the spy does see a valid publish
        assert spy.touched == ["publish"]


@pytest.mark.parametrize(("method", "args"), BAD_CALLS)
async def test_async_rejects_bad_input_before_sending(method: str, args: tuple[Any, ...]) -> None:
    """AsyncPublisher validates exactly like Publisher: ValueError, no command issued."""
    spy = Spy(fakeredis.FakeAsyncRedis())
    async with AsyncPublisher(client=spy) as pub:  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await getattr(pub, method)(*args)
        assert spy.touched == []


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fix the two varying envelope fields (id, ts) so payloads can be compared byte for byte."""
    monkeypatch.setattr(publisher.envelope, "new_message_id", lambda: "m-1")
    monkeypatch.setattr(publisher.envelope, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.5))


async def test_sync_and_async_send_identical_bytes(frozen: None) -> None:
    """Publisher and AsyncPublisher put the same bytes on the same channel: one pure packer."""
    cap = Capture()
    msg = {"type": "news", "data": {"n": [1, "x"]}, "timestamp": 1_700_000_000, "metadata": {"k": 1}}
    with Publisher(client=fakeredis.FakeRedis(server=cap.server), origin_id="w1") as pub:
        assert pub.broadcast_to_room("lobby", msg) == 1
        pub.publish_many([(Target("user", "u1"), msg), (Target("all"), msg)])
    async with AsyncPublisher(client=fakeredis.FakeAsyncRedis(server=cap.server), origin_id="w1") as apub:
        assert await apub.broadcast_to_room("lobby", msg) == 1
        await apub.publish_many([(Target("user", "u1"), msg), (Target("all"), msg)])
    sent = cap.messages()
    assert len(sent) == 6 and sent[:3] == sent[3:]
    keys = Keys()
    expected = envelope_for(Target("room", "lobby"), Message.from_wire(msg), "pub:w1", keys)
    assert sent[0] == expected
    assert [c for c, _ in sent[:3]] == [keys.room_channel("lobby"), keys.user_channel("u1"), keys.all]


def test_envelope_shape_and_origin() -> None:
    """The payload is the envelope of docs/redis.md: v=1, a string id, origin "pub:<id>", the message."""
    cap = Capture()
    with Publisher(client=fakeredis.FakeRedis(server=cap.server), origin_id="billing") as pub:
        pub.broadcast_to_user("u1", Message("invoice", {"n": 1}))
    [(channel, payload)] = cap.messages()
    raw = msgpack.unpackb(payload)
    assert channel == "hub:user:{u1}" and raw["v"] == 1 and isinstance(raw["id"], str)
    assert raw["origin"] == "pub:billing" and raw["msg"]["type"] == "invoice"
    assert unpack(payload).msg.data == {"n": 1}


def test_timestamp_defaults_to_now_and_is_kept_when_given() -> None:
    """A message without timestamp is stamped with the current time; a given one is untouched."""
    before = int(time.time())
    stamped = prepare(Target("all"), {"type": "t"}, "pub:x", Keys()).message.timestamp
    assert before <= stamped <= int(time.time())
    assert prepare(Target("all"), {"type": "t", "timestamp": 5}, "pub:x", Keys()).message.timestamp == 5


def test_channels_follow_the_key_prefix() -> None:
    """Every publish kind goes to the channel Keys names under the publisher's prefix."""
    cap = Capture()
    keys = Keys("app1:")
    with Publisher(client=fakeredis.FakeRedis(server=cap.server), key_prefix="app1:") as pub:
        pub.broadcast_to_all({"type": "a"})
        pub.broadcast_to_room("r1", {"type": "b"})
        pub.broadcast_to_user("u1", {"type": "c"})
    channels = [c for c, _ in cap.messages()]
    assert channels == [keys.all, keys.room_channel("r1"), keys.user_channel("u1")]


def _calls_of(query: Any, answers: list[Any]) -> list[Any]:
    """Drive a query with canned answers and return the steps it asked for."""
    asked: list[Any] = []

    def execute(step: Any) -> Any:
        asked.append(step)
        return answers.pop(0)

    drive(query, execute)
    return asked


def test_inspection_reads_the_keys_named_by_keys() -> None:
    """Each inspection query asks for exactly the keys Keys builds, under any prefix."""
    keys = Keys("p:")
    scan = {"cursor": 0, "count": hub_inspect.SCAN_COUNT}
    assert _calls_of(hub_inspect.rooms(keys), [[b"n1", b"n2"], [(0, [b"r1"]), (0, [b"r1", b"r2"])], [2, 0]]) == [
        Call("zrange", ("p:nodes", 0, -1)),
        [Call("sscan", ("p:node:{n1}:rooms",), scan), Call("sscan", ("p:node:{n2}:rooms",), scan)],
        [Call("hlen", ("p:members:{r1}",)), Call("hlen", ("p:members:{r2}",))]]
    assert _calls_of(hub_inspect.room_members(keys, "r1"), [(0, {})])[0].args == (keys.members("r1"),)
    assert _calls_of(hub_inspect.room_count(keys), [[]]) == [Call("zrange", (keys.nodes, 0, -1))]
    assert _calls_of(hub_inspect.user_online(keys, "u1"), [None]) == [Call("hlen", ("p:online:{u1}",))]
    steps = _calls_of(hub_inspect.live_nodes(keys, now=1000), [[(b"n1", 5000.0)], [{}]])
    assert steps[0].args == (keys.nodes, "(1000", "+inf")
    assert steps[1] == [Call("hgetall", (keys.node("n1"),))]


def test_hscan_follows_the_cursor_until_zero() -> None:
    """room_members reads every HSCAN page and merges them."""
    pages = [(7, {b"a:1": b"u1"}), (3, {b"b:2": b""}), (0, {b"a:1": b"u1", b"a:x:10": b"u2"})]
    members = drive(hub_inspect.room_members(Keys(), "r"), lambda step: pages.pop(0))
    assert members == [hub_inspect.Member("a:1", "u1", "a"), hub_inspect.Member("a:x:10", "u2", "a:x"),
                       hub_inspect.Member("b:2", None, "b")]
    assert pages == []


def test_member_parsing() -> None:
    """The node is everything before the last ':' of the conn_id; "" means anonymous."""
    assert hub_inspect.node_of("eu-1:node:42") == "eu-1:node"
    assert hub_inspect.member_of(b"n1:3", b"") == hub_inspect.Member("n1:3", None, "n1")
    assert hub_inspect.member_of("n1:3", "bob") == hub_inspect.Member("n1:3", "bob", "n1")


def test_node_info_with_and_without_heartbeat_at() -> None:
    """heartbeat_age comes from heartbeat_at when present, else None; odd fields degrade."""
    now = 1_700_000_000_000
    full = hub_inspect.node_info(b"n1", now + 6000, {b"clients": b"4", b"heartbeat_at": str(now - 1500),
                                                     b"started_at": b"1700000000.5", b"address": b"h:1",
                                                     b"version": b"0.1.0"}, now)
    assert full == hub_inspect.NodeInfo("n1", 4, 6.0, 1.5, 1_700_000_000.5, "h:1", "0.1.0")
    bare = hub_inspect.node_info("n2", now + 100, {"clients": "junk"}, now)
    assert bare == hub_inspect.NodeInfo("n2", 0, 0.1)
    in_ms = hub_inspect.node_info("n3", now, {"started_at": "1700000000500"}, now)
    assert in_ms.started_at == 1_700_000_000.5


def test_stats_sums_live_nodes_and_counts_rooms() -> None:
    """stats = (sum of live nodes' clients, rooms with members in any listed node's index, live nodes)."""
    answers = [[("a", 9e12), ("b", 9e12)], [{"clients": "2"}, {"clients": "5"}],
               [b"a", b"b", b"dead"], [(0, [b"x", b"y"]), (0, [b"y"]), (0, [b"z", b"gone"])], [1, 4, 0, 2]]
    result = drive(hub_inspect.stats(Keys(), now=1), lambda step: answers.pop(0))
    assert result == hub_inspect.HubStats(clients=7, rooms=3, nodes=2)
    assert answers == []


def test_origin_and_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """origin is "pub:<id>" (random by default); URL and prefix default from HUB_* variables."""
    assert make_origin("w1") == "pub:w1"
    assert make_origin().startswith("pub:") and make_origin() != make_origin()
    with pytest.raises(ValueError):
        make_origin("has space")
    monkeypatch.delenv("HUB_REDIS_URL", raising=False)
    monkeypatch.delenv("HUB_KEY_PREFIX", raising=False)
    assert (default_url(), default_prefix()) == ("redis://127.0.0.1:6379/0", "hub:")
    monkeypatch.setenv("HUB_REDIS_URL", "redis://r:1/2")
    monkeypatch.setenv("HUB_KEY_PREFIX", "x:")
    assert (default_url(), default_prefix()) == ("redis://r:1/2", "x:")
    assert Publisher().keys == Keys("x:")  # connects lazily: no Redis needed to construct


def test_close_releases_only_an_owned_client() -> None:
    """close() closes the publisher's own connection, never a client passed in; a closed one refuses."""
    client = fakeredis.FakeRedis()
    with Publisher(client=client) as pub:
        pass
    assert client.ping()
    with pytest.raises(RuntimeError, match="closed"):
        pub.broadcast_to_all({"type": "t"})
    pub.close()  # idempotent


async def test_async_close_refuses_further_publishes() -> None:
    """A closed AsyncPublisher raises instead of reconnecting silently."""
    async with AsyncPublisher(client=fakeredis.FakeAsyncRedis()) as pub:
        assert await pub.broadcast_to_all({"type": "t"}) == 0
    with pytest.raises(RuntimeError, match="closed"):
        await pub.broadcast_to_all({"type": "t"})


def test_recording_publisher_records_in_order() -> None:
    """RecordingPublisher notes each publish's target and decoded message, returning node_count."""
    rec = RecordingPublisher(node_count=3)
    assert isinstance(rec, Publisher)
    assert rec.broadcast_to_room("r1", {"type": "a", "data": 1}) == 3
    assert rec.broadcast_to_user("u1", Message("b")) == 3
    assert rec.publish_many([(Target("all"), {"type": "c"}), (Target("room", "r1"), {"type": "d"})]) == [3, 3]
    assert [m.type for m in rec.messages()] == ["a", "b", "c", "d"]
    assert [m.type for m in rec.to_room("r1")] == ["a", "d"]
    assert [m.type for m in rec.to_user("u1")] == ["b"] and [m.type for m in rec.to_all()] == ["c"]
    first = rec.published[0]
    assert first.channel == "hub:room:{r1}" and first.envelope.origin == rec.origin
    assert unpack(first.payload).msg == first.message
    rec.clear()
    assert rec.published == []


def test_recording_publisher_validates_like_publisher() -> None:
    """A bad message raises the same ValueError and records nothing, batch included."""
    rec = RecordingPublisher()
    for method, args in BAD_CALLS:
        with pytest.raises(ValueError):
            getattr(rec, method)(*args)
    assert rec.published == []


def test_recording_publisher_cannot_inspect() -> None:
    """Inspection on a recorder fails loudly rather than inventing an answer."""
    with pytest.raises(NotImplementedError, match="no Redis"):
        RecordingPublisher().rooms()


def test_cli_table_and_redaction() -> None:
    """hubctl tables align columns (numbers right); error messages never show a password."""
    assert table(["ROOM", "N"], [["a", 1], ["bbb", 10]]) == ["ROOM   N", "a      1", "bbb   10"]
    assert redact("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


# -- server-side control and presence (docs/protocol.md) -------------------

BAD_CONTROL_CALLS = [
    ("disconnect_user", ("a b",), {}),
    ("disconnect_user", ("",), {}),
    ("disconnect_user", (7,), {}),
    ("disconnect_user", ("u1",), {"reason": "x" * 257}),
    ("disconnect_user", ("u1",), {"reason": 5}),
    ("disconnect_user", ("u1",), {"reconnect": "yes"}),
    ("disconnect_connection", ("n1",), {}),
    ("disconnect_connection", ("n1:x",), {}),
    ("disconnect_connection", ("u1",), {"reason": "x" * 257}),
    ("join_user", ("u1", "a b"), {}),
    ("join_user", ("u{1}", "r"), {}),
    ("join_user", ("u1", ""), {}),
    ("leave_user", ("u1", "r" * 129), {}),
    ("leave_user", ("", "r"), {}),
    ("presence", ("a b",), {}),
    ("presence", ("",), {}),
]


@pytest.mark.parametrize(("method", "args", "kwargs"), BAD_CONTROL_CALLS)
def test_sync_control_rejects_bad_input_before_sending(method: str, args: tuple[Any, ...],
                                                       kwargs: dict[str, Any]) -> None:
    """A bad user id, connection id, room, reason or flag raises ValueError and issues no Redis command."""
    spy = Spy(fakeredis.FakeRedis())
    with Publisher(client=spy) as pub:  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            getattr(pub, method)(*args, **kwargs)
        assert spy.touched == []
        assert pub.disconnect_user("u1") == 0  # the spy does see a valid command
        assert spy.touched == ["publish"]


@pytest.mark.parametrize(("method", "args", "kwargs"), BAD_CONTROL_CALLS)
async def test_async_control_rejects_bad_input_before_sending(method: str, args: tuple[Any, ...],
                                                              kwargs: dict[str, Any]) -> None:
    """AsyncPublisher validates control calls exactly like Publisher: ValueError, no command issued."""
    spy = Spy(fakeredis.FakeAsyncRedis())
    async with AsyncPublisher(client=spy) as pub:  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await getattr(pub, method)(*args, **kwargs)
        assert spy.touched == []
        assert await pub.join_user("u1", "r") == 0
        assert spy.touched == ["publish"]


@pytest.fixture
def frozen_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fix a control envelope's id and ts, so payloads can be compared byte for byte."""
    monkeypatch.setattr(publisher.control, "new_message_id", lambda: "c-1")
    monkeypatch.setattr(publisher.control, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.5))


CONTROL_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], Command]] = [
    ("disconnect_user", ("alice",), {"reason": "bye", "reconnect": True},
     Command("disconnect", user="alice", reason="bye", reconnect=True)),
    ("disconnect_connection", ("eu:n2:7",), {}, Command("disconnect", conn="eu:n2:7")),
    ("join_user", ("alice", "lobby"), {}, Command("join", user="alice", room="lobby")),
    ("leave_user", ("alice", "lobby"), {}, Command("leave", user="alice", room="lobby")),
]


async def test_sync_and_async_send_identical_control_bytes(frozen_control: None) -> None:
    """Publisher and AsyncPublisher put exactly pack_command's bytes on the command's channel."""
    cap = Capture()
    keys = Keys("app1:")
    with Publisher(client=fakeredis.FakeRedis(server=cap.server), origin_id="w1", key_prefix="app1:") as pub:
        for method, args, kwargs, _ in CONTROL_CALLS:
            assert getattr(pub, method)(*args, **kwargs) == 1  # PUBLISH counts the pattern subscriber
    async with AsyncPublisher(client=fakeredis.FakeAsyncRedis(server=cap.server), origin_id="w1",
                              key_prefix="app1:") as apub:
        for method, args, kwargs, _ in CONTROL_CALLS:
            assert await getattr(apub, method)(*args, **kwargs) == 1
    sent = cap.messages()
    expected = [(command.channel(keys), pack_command(command, "pub:w1")[1]) for *_, command in CONTROL_CALLS]
    assert sent == expected * 2
    assert [c for c, _ in expected] == ["app1:user:{alice}", "app1:node:{eu:n2}", "app1:user:{alice}",
                                        "app1:user:{alice}"]


def test_control_never_goes_through_the_history_script() -> None:
    """With history on for every room and user, a command is still one plain PUBLISH: it is never stored."""
    spy = Spy(fakeredis.FakeRedis())
    with Publisher(client=spy, history_size=10, history_rooms="*", history_users=True) as pub:  # type: ignore[arg-type]
        for method, args, kwargs, _ in CONTROL_CALLS:
            getattr(pub, method)(*args, **kwargs)
    assert spy.touched == ["publish"] * len(CONTROL_CALLS)
    assert spy.inner.keys("*") == []


class Flaky:
    """A client whose first `failures` PUBLISHes raise ConnectionError; notes the arguments of every try."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.tries: list[tuple[Any, ...]] = []

    def publish(self, *args: Any) -> Any:
        self.tries.append(args)
        if len(self.tries) <= self.failures:
            raise redis.ConnectionError("lost")
        return self.inner.publish(*args)


class AsyncFlaky(Flaky):
    async def publish(self, *args: Any) -> Any:  # type: ignore[override]
        self.tries.append(args)
        if len(self.tries) <= self.failures:
            raise redis.ConnectionError("lost")
        return await self.inner.publish(*args)


def test_control_retries_resend_the_same_envelope() -> None:
    """With retries, a command whose connection was lost is resent with the same bytes (same envelope id)."""
    cap = Capture()
    flaky = Flaky(fakeredis.FakeRedis(server=cap.server), failures=2)
    with Publisher(client=flaky, retries=2) as pub:  # type: ignore[arg-type]
        assert pub.disconnect_user("alice", reason="bye") == 1  # the Capture's pattern subscriber
    assert len(flaky.tries) == 3 and len(set(flaky.tries)) == 1
    [(channel, payload)] = cap.messages()
    assert (channel, payload) == flaky.tries[0]
    assert command_of(unpack(payload).control) == Command("disconnect", user="alice", reason="bye")
    without = Flaky(fakeredis.FakeRedis(server=cap.server), failures=1)
    with Publisher(client=without) as pub, pytest.raises(redis.ConnectionError):  # type: ignore[arg-type]
        pub.join_user("alice", "r")
    assert len(without.tries) == 1 and cap.messages() == []


async def test_async_control_retries_resend_the_same_envelope() -> None:
    """AsyncPublisher resends a lost command with the same bytes, as many times as `retries` allows."""
    flaky = AsyncFlaky(fakeredis.FakeAsyncRedis(), failures=1)
    async with AsyncPublisher(client=flaky, retries=1) as pub:  # type: ignore[arg-type]
        assert await pub.leave_user("alice", "r") == 0
    assert len(flaky.tries) == 2 and flaky.tries[0] == flaky.tries[1]
    flaky = AsyncFlaky(fakeredis.FakeAsyncRedis(), failures=2)
    async with AsyncPublisher(client=flaky, retries=1) as pub:  # type: ignore[arg-type]
        with pytest.raises(redis.ConnectionError):
            await pub.leave_user("alice", "r")
    assert len(flaky.tries) == 2


def test_presence_reads_one_script_over_the_presence_and_members_hashes() -> None:
    """presence() counts users from the presence hash and anonymous connections as HLEN(members) - sum."""
    server = fakeredis.FakeServer()
    raw = fakeredis.FakeRedis(server=server)
    keys = Keys("p:")
    raw.hset(keys.presence("lobby"), mapping={"alice": 2, "bob": 1, "gone": 0})
    raw.hset(keys.members("lobby"), mapping={"n1:1": "alice", "n2:4": "alice", "n1:2": "bob", "n1:3": "",
                                             "n2:9": ""})
    with Publisher(client=fakeredis.FakeRedis(server=server), key_prefix="p:") as pub:
        found = pub.presence("lobby")
        assert pub.presence("empty") == hub_inspect.Presence("empty", {}, 0)
    assert found == hub_inspect.Presence("lobby", {"alice": 2, "bob": 1}, 2)
    assert found.to_json() == {"room": "lobby", "users": {"alice": 2, "bob": 1}, "anonymous": 2}


def test_recording_publisher_records_commands() -> None:
    """RecordingPublisher notes each control command, decoded from its envelope, and returns node_count."""
    rec = RecordingPublisher(node_count=2)
    for method, args, kwargs, _ in CONTROL_CALLS:
        assert getattr(rec, method)(*args, **kwargs) == 2
    assert rec.commands == [command for *_, command in CONTROL_CALLS]
    assert rec.published == []  # commands are not messages
    rec.broadcast_to_user("alice", {"type": "t"})
    assert [m.type for m in rec.to_user("alice")] == ["t"] and len(rec.commands) == 4
    rec.node_count = 0
    assert rec.disconnect_user("ghost") == 0
    rec.clear()
    assert rec.commands == [] and rec.published == []


def test_recording_publisher_validates_commands_and_cannot_answer_presence() -> None:
    """A bad command raises ValueError and records nothing; presence() fails loudly, like every inspection."""
    rec = RecordingPublisher()
    for method, args, kwargs in BAD_CONTROL_CALLS:
        with pytest.raises(ValueError):
            getattr(rec, method)(*args, **kwargs)
    assert rec.commands == [] and rec.published == []
    with pytest.raises(NotImplementedError, match="presence"):
        rec.presence("lobby")
