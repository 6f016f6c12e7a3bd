"""Stream history through the races a review found (docs/protocol.md), kept as regression tests.

Most scenarios are interleavings, played on an in-process Node whose broker
is a MemoryBroker that can misbehave on cue (`FaultyBroker`): hold a stream
read's reply back after the read ran (a slow Redis answer), fail reads, lose
live messages (the subscriber connection is down while Redis still stores
and publishes them), or keep live messages in flight until released.
Connections are `Recorder`s: they keep every frame, and a join's ack, in the
order the node sent them. Nothing waits on time: every step waits for a
condition.

The rest needs Redis itself (the shipped Lua script's bound, the publisher's
retry ids, stream entries that only a publisher in another language would
store): one real node process on the session's redis-server, under a key
prefix of this module.
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import aiohttp
import msgpack
import orjson
import pytest
import redis

import hubnode.broker.memory
from hubnode.auth import Identity
from hubnode.broker.base import BrokerUnavailable
from hubnode.broker.memory import MemoryBroker
from hubnode.config import Config
from hubnode.connection import Connection
from hubnode.errors import ErrorCode
from hubnode.frames import Frame
from hubnode.node import Node
from hubnode.protocol import Since
from publisher import Publisher
from publisher.core import prepare, prepare_many, publish_call, publish_query
from publisher.history import PUBLISH_SCRIPT, HistoryPolicy, StreamRead, StreamRef
from publisher.keys import Keys
from publisher.query import Step, drive, run_step
from publisher.targets import Target
from tests.helpers import Client, NodeProcess, RedisServer, metric, wait_until
from tests.integration.test_history import recv_n

ROOM = "r"


# -- the in-process harness ------------------------------------------------------------------------

class FaultyBroker(MemoryBroker):
    """A MemoryBroker that misbehaves on cue, as Redis and the network can."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[asyncio.Event] = []  # the next reads' replies wait for these, one each
        self.waiting = 0  # reads whose reply is held back now
        self.fail_reads = False  # a read (once its gate opened) raises BrokerUnavailable
        self.deaf = False  # the subscriber is down: messages are stored and published, heard by nobody
        self.delaying = False  # live messages stay in flight until `flush`
        self.in_flight: list[tuple[str, bytes]] = []

    def hold_read(self) -> asyncio.Event:
        """The next read runs at once (its snapshot is taken) but answers only when the event is set."""
        gate = asyncio.Event()
        self.gates.append(gate)
        return gate

    async def read_stream(self, ref: StreamRef, since: int, limit: int = 0,
                          create: HistoryPolicy | None = None) -> StreamRead:
        read = await super().read_stream(ref, since, limit, create)  # atomic, as the Lua script is
        if self.gates:
            gate = self.gates.pop(0)
            self.waiting += 1
            try:
                await gate.wait()
            finally:
                self.waiting -= 1
        if self.fail_reads:
            raise BrokerUnavailable("stream read failed (simulated Redis timeout)")
        return read

    async def publish(self, channel: str, payload: bytes) -> int:
        if self.deaf:
            return 0
        if self.delaying and channel in self.channels:
            self.in_flight.append((channel, payload))
            return 1
        return await super().publish(channel, payload)

    async def flush(self) -> None:
        """The messages in flight reach the node, in order."""
        pending, self.in_flight = self.in_flight, []
        for channel, payload in pending:
            await super().publish(channel, payload)


class Recorder:
    """What a Node needs of a Connection; keeps every frame it is sent, decoded, in order."""

    slow = False

    def __init__(self, conn_id: str, user_id: str | None) -> None:
        self.id = conn_id
        self.user_id = user_id
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send(self, frame: Frame) -> bool:
        self.frames.append(orjson.loads(frame.payload))
        return True

    def close_soon(self, code: int, reason: str = "") -> None:
        self.closed = (int(code), reason)

    async def close(self, code: int, reason: str = "") -> None:
        self.close_soon(code, reason)

    def ack(self, data: dict[str, Any] | None) -> None:
        """A join's answer, recorded in line with the frames."""
        self.frames.append({"type": "ack", "data": data})

    def offsets(self, room: str = ROOM) -> list[int]:
        """The offsets of the room's messages, as received."""
        return [f["offset"] for f in self.frames if f["type"] == "m" and f.get("room") == room]

    def acks(self) -> list[dict[str, Any] | None]:
        return [f["data"] for f in self.frames if f["type"] == "ack"]

    def after_last_ack(self, room: str = ROOM) -> list[int]:
        """The offsets received after the last ack."""
        last = max(i for i, f in enumerate(self.frames) if f["type"] == "ack")
        return [f["offset"] for f in self.frames[last + 1:] if f["type"] == "m" and f.get("room") == room]

    def resyncs(self) -> int:
        return sum(1 for f in self.frames if f["type"] == "system_message" and f.get("data") == {"event": "resync"})

    def epoch(self) -> str:
        return str(next(f["epoch"] for f in self.frames if f["type"] == "m"))


Start = Callable[..., Awaitable[tuple[Node, FaultyBroker]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Starts in-process nodes on a FaultyBroker (history on, 100 messages by default); stops them after."""
    nodes: list[Node] = []

    async def run(**settings: Any) -> tuple[Node, FaultyBroker]:
        broker = FaultyBroker()
        node = Node(Config(**{"node_id": "n1", "ping_interval": 0, "history_size": 100, **settings}), broker=broker)
        await node.start()
        nodes.append(node)
        return node, broker

    yield run
    for node in nodes:
        for conn in list(node.conns.values()):
            await node.disconnect(conn)
        await node.drain(2)


async def connect(node: Node, user: str | None = None) -> Recorder:
    conn = Recorder(await node.admit(Identity(user)), user)
    node.attach(cast(Connection, conn))
    return conn


async def publish(node: Node, count: int, room: str = ROOM) -> None:
    for _ in range(count):
        await node.broadcast_to_room(room, {"type": "m", "data": "x"})


async def received(conn: Recorder, offset: int, room: str = ROOM) -> None:
    await wait_until(lambda: offset in conn.offsets(room), what=f"{conn.id} to get offset {offset}")


async def settled(node: Node) -> None:
    """The node's background work (recoveries, store updates) is done."""
    await wait_until(lambda: not node._updates, what="the node's recoveries to finish")


# -- a subscriber loss while a join reads the stream -----------------------------------------------

async def test_a_loss_while_a_join_reads_leaves_no_gap_after_its_ack(start: Start) -> None:
    """Messages lost live while the join's read was in flight are not skipped: the connection gets
    every offset above its ack's, once, in order, and no resync (the stream was recoverable)."""
    node, broker = await start()
    b = await connect(node)
    await publish(node, 3)  # 1..3: nobody on this node listens yet
    gate = broker.hold_read()
    join = asyncio.create_task(node.join(b.id, ROOM, None, b.ack))
    await wait_until(lambda: broker.waiting == 1, what="the join's read to run (top 3)")
    broker.deaf = True
    await publish(node, 2)  # 4, 5: lost on the subscriber connection
    broker.deaf = False
    node.on_resync()  # resubscribed
    await publish(node, 1)  # 6: live again
    gate.set()
    assert await join is None
    await publish(node, 1)  # 7
    await received(b, 7)
    await settled(node)
    [ack] = b.acks()
    assert ack is not None and ack["epoch"] == b.epoch()
    assert b.after_last_ack() == list(range(ack["offset"] + 1, 8)), (ack, b.frames)
    assert b.offsets() == b.after_last_ack() and b.resyncs() == 0


async def test_a_loss_while_a_join_reads_and_the_node_recovers_leaves_no_gap_for_either_member(start: Start) -> None:
    """The same with another member: the node's own recovery read and the join's read race; the
    plain member recovers 4 and 5, the joiner gets every offset above its ack; nobody gets resync."""
    node, broker = await start()
    a, b = await connect(node), await connect(node)
    assert await node.join(a.id, ROOM, None, a.ack) is None
    await publish(node, 3)  # a is plain at 3
    join_gate, recovery_gate = broker.hold_read(), broker.hold_read()
    join = asyncio.create_task(node.join(b.id, ROOM, None, b.ack))
    await wait_until(lambda: broker.waiting == 1, what="the join's read to run (top 3)")
    broker.deaf = True
    await publish(node, 2)  # 4, 5 lost live
    broker.deaf = False
    node.on_resync()
    await wait_until(lambda: broker.waiting == 2, what="the recovery read to run")
    await publish(node, 1)  # 6: held by the recovery, buffered for b
    join_gate.set()
    assert await join is None
    recovery_gate.set()
    await publish(node, 1)  # 7
    await received(a, 7)
    await received(b, 7)
    await settled(node)
    assert a.offsets() == [1, 2, 3, 4, 5, 6, 7] and a.resyncs() == 0
    [ack] = b.acks()
    assert ack is not None
    assert b.after_last_ack() == list(range(ack["offset"] + 1, 8)), (ack, b.frames)
    assert b.offsets() == b.after_last_ack() and b.resyncs() == 0


async def test_a_loss_before_a_reconnect_is_attached_leaves_no_hole(start: Start) -> None:
    """A user reconnects with since; its stream is read at the handshake, and messages are lost
    before the upgrade makes the connection live. It must not get `connected` and then a hole: it
    is closed 1013 (reconnect), or gets every missed offset; the next reconnect recovers them all."""
    node, broker = await start()
    earlier = await connect(node, "u")
    for _ in range(2):
        await node.broadcast_to_user("u", {"type": "m", "data": "x"})  # 1, 2
    await node.disconnect(cast(Connection, earlier))
    since = Since(2, earlier.epoch())
    conn = Recorder(await node.admit(Identity("u"), since), "u")  # the user stream is read here: top 2
    broker.deaf = True
    for _ in range(2):
        await node.broadcast_to_user("u", {"type": "m", "data": "x"})  # 3, 4: lost live
    broker.deaf = False
    node.on_resync()
    await node.broadcast_to_user("u", {"type": "m", "data": "x"})  # 5
    await settled(node)
    node.attach(cast(Connection, conn), since)
    got = [f["offset"] for f in conn.frames if f["type"] == "m"]
    assert got == list(range(3, 3 + len(got))), conn.frames  # nothing after a hole
    assert got == [3, 4, 5] or (conn.closed is not None and conn.closed[0] == 1013), (conn.closed, conn.frames)
    await node.disconnect(cast(Connection, conn))
    again = Recorder(await node.admit(Identity("u"), since), "u")
    node.attach(cast(Connection, again), since)
    assert again.frames[0]["type"] == "connected" and again.frames[0]["data"]["recovered"] is True
    assert [f["offset"] for f in again.frames if f["type"] == "m"] == [3, 4, 5]


# -- after a failed recovery -----------------------------------------------------------------------

async def test_a_second_loss_after_a_failed_recovery_is_recovered_or_announced(start: Start) -> None:
    """A failed recovery leaves the channel's position unknown; a second loss before the next live
    message must not pass silently: the member gets the lost messages or a resync."""
    node, broker = await start()
    a = await connect(node)
    assert await node.join(a.id, ROOM, None, a.ack) is None
    await publish(node, 3)
    broker.fail_reads = True
    node.on_resync()  # loss 1: the recovery read fails
    await wait_until(lambda: a.resyncs() == 1, what="the resync of the failed recovery")
    await settled(node)
    broker.fail_reads = False
    seen = len(a.frames)
    broker.deaf = True
    await publish(node, 2)  # loss 2: 4, 5
    broker.deaf = False
    node.on_resync()
    await publish(node, 1)  # 6
    await received(a, 6)
    await settled(node)
    later = a.frames[seen:]
    got = [f["offset"] for f in later if f["type"] == "m"]
    announced = any(f["type"] == "system_message" and f.get("data") == {"event": "resync"} for f in later)
    assert got == [4, 5, 6] or (announced and got == [6]), later


async def test_a_failed_recovery_does_not_repeat_what_a_member_got_from_its_replay(start: Start) -> None:
    """A joiner replayed up to 6 while 4..6 are still in flight live; the recovery fails: it gets
    a resync, and no repeat of 4..6 (its floor stays)."""
    node, broker = await start()
    a, b = await connect(node), await connect(node)
    assert await node.join(a.id, ROOM, None, a.ack) is None
    await publish(node, 3)  # the node's position: 3
    broker.delaying = True
    await publish(node, 3)  # 4..6 in flight to the node
    broker.delaying = False
    epoch = a.epoch()
    assert await node.join(b.id, ROOM, Since(0, epoch), b.ack) is None  # replay 1..6: floor 6
    assert b.offsets() == [1, 2, 3, 4, 5, 6]
    broker.fail_reads = True
    node.on_resync()  # a loss, and its recovery read fails
    await broker.flush()  # 4..6 arrive (held while the recovery runs)
    await wait_until(lambda: b.resyncs() == 1, what="b's resync")
    await settled(node)
    broker.fail_reads = False
    await publish(node, 1)  # 7
    await received(b, 7)
    assert b.offsets() == [1, 2, 3, 4, 5, 6, 7], b.frames
    assert sorted(set(a.offsets())) == a.offsets() and a.offsets()[-1] == 7  # no repeats for a either


# -- repeated and concurrent joins of one connection -----------------------------------------------

async def test_a_repeated_join_skips_nothing_still_in_flight(start: Start) -> None:
    """A member sends join_room again (no since) while more than the window is in flight to the node:
    it keeps every message, once, and the ack says where it was."""
    node, broker = await start(history_size=3)
    a, other = await connect(node), await connect(node)
    for conn in (a, other):
        assert await node.join(conn.id, ROOM, None, conn.ack) is None
    await publish(node, 3)  # both at 3
    broker.delaying = True
    await publish(node, 7)  # 4..10 on the wire: 4..7 have left the window already
    broker.delaying = False
    assert await node.join(a.id, ROOM, None, a.ack) is None
    await broker.flush()
    await received(a, 10)
    await received(other, 10)
    assert a.acks()[-1] == {"offset": 3, "epoch": a.epoch()}
    assert a.offsets() == other.offsets() == list(range(1, 11))
    assert a.resyncs() == 0


@pytest.mark.parametrize("second", ["hub_api", "client_since"])
async def test_two_joins_of_one_connection_in_flight_both_answer_and_lose_nothing(start: Start, second: str) -> None:
    """The client's join_room and a second join (the Hub API's, or the client's again with since)
    in flight together: the connection stays open, each join answers, every offset arrives once."""
    node, broker = await start()
    a, other = await connect(node), await connect(node)
    assert await node.join(other.id, ROOM, None, other.ack) is None
    await publish(node, 3)  # the node's position: 3
    gate = broker.hold_read()
    first = asyncio.create_task(node.join(a.id, ROOM, None, a.ack))
    await wait_until(lambda: broker.waiting == 1, what="the first join's read to run")
    await publish(node, 1)  # 4, while the first join reads
    if second == "hub_api":
        await node.join_room(a.id, ROOM)
    else:
        assert await node.join(a.id, ROOM, Since(0, other.epoch()), a.ack) is None
    gate.set()
    assert await first is None
    await publish(node, 1)  # 5
    await received(a, 5)
    assert a.closed is None and ROOM in node.rooms_of(a.id)
    assert len(a.acks()) == (1 if second == "hub_api" else 2)
    got = a.offsets()
    assert got == sorted(set(got)) and got[-1] == 5  # once each, in order
    for i, frame in enumerate(a.frames):  # each ack's offset is the last message sent before it
        if frame["type"] == "ack":
            before = [f["offset"] for f in a.frames[:i] if f["type"] == "m"]
            assert frame["data"]["offset"] == (before[-1] if before else 3), a.frames
    last = a.acks()[-1]
    assert last is not None and a.after_last_ack() == list(range(last["offset"] + 1, 6))


@pytest.mark.parametrize("with_since", [False, True])
async def test_a_repeated_join_whose_read_fails_keeps_the_member_whole(start: Start, with_since: bool) -> None:
    """A member asks to join again; the stream read (if any) hangs while live messages flow, then
    fails: the member stays a member and loses none of them. Without since the join is a no-op that
    succeeds; with since it answers unavailable (and takes no effect)."""
    node, broker = await start()
    a, other = await connect(node), await connect(node)
    for conn in (a, other):
        assert await node.join(conn.id, ROOM, None, conn.ack) is None
    await publish(node, 3)  # both at 3
    gate = broker.hold_read()
    since = Since(3, a.epoch()) if with_since else None
    join = asyncio.create_task(node.join(a.id, ROOM, since, a.ack))
    await wait_until(lambda: join.done() or broker.waiting == 1, what="the join to read or answer")
    await publish(node, 3)  # 4..6 while the read is in flight
    broker.fail_reads = True
    gate.set()
    assert await join == (ErrorCode.UNAVAILABLE if with_since else None)
    broker.fail_reads = False
    await publish(node, 1)  # 7
    await received(other, 7)
    await received(a, 7)
    assert ROOM in node.rooms_of(a.id)
    assert a.offsets() == other.offsets() == [1, 2, 3, 4, 5, 6, 7]
    assert len(a.acks()) == (1 if with_since else 2)  # the first join's; the no-op's


# -- memory held by history ------------------------------------------------------------------------

async def test_the_embedded_broker_forgets_expired_streams_nobody_touches_again(
        start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of streams that expire and are never published to again do not stay in memory."""
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(hubnode.broker.memory, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    node, broker = await start(history_ttl=1)
    for i in range(2000):
        await node.broadcast_to_room(f"room-{i}", {"type": "m", "data": i})
    for i in range(500):
        await node.broadcast_to_user(f"user-{i}", {"type": "m", "data": i})
    clock.now += 2  # every stream's ttl has passed
    await publish(node, 4 * 1024, room="busy")  # one live stream (the broker sweeps now and then, not each time)
    held = len(broker.streams._streams)  # the embedded broker's streams, by key
    assert held == 1, f"{held} streams held after every other one expired"


async def test_stream_bookkeeping_of_gone_connections_is_released(start: Start) -> None:
    """Users connect (each has a stream with history), a subscriber loss recovers their streams,
    they leave: nothing of theirs stays in the node's history bookkeeping."""
    node, _ = await start()
    for _ in range(2):
        conns = [await connect(node, f"u{i}") for i in range(300)]
        node.on_resync()
        await settled(node)
        for conn in conns:
            await node.disconnect(cast(Connection, conn))
        assert node.history.streams.channels() == []
        assert len(node.history._refs) == 0  # the keeper's stream refs, by channel


# -- Redis: the shipped script and the publisher ---------------------------------------------------

PREFIX = "races:"
KEYS = Keys(PREFIX)
SIZE = 100


@pytest.fixture(scope="module")
def redis_node(redis_server: RedisServer) -> Iterator[NodeProcess]:
    node = NodeProcess("--redis-url", redis_server.url, "--key-prefix", PREFIX, "--history-size", str(SIZE),
                       "--rate", "0").start()
    yield node
    node.stop()


@pytest.fixture
def pub(redis_server: RedisServer) -> Iterator[Publisher]:
    with Publisher(redis_server.url, key_prefix=PREFIX, history_size=SIZE) as p:
        yield p


@pytest.fixture
def rc(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def script_publish(rc: redis.Redis, room: str, envelope: bytes, envelope_id: str, size: int = 0) -> Any:
    """Publish through the shipped Lua script as a publisher in another language would (README:
    KEYS = the stream, its :meta and its :ids; ARGV = channel, envelope, id, size, ttl, fresh epoch)."""
    stream = KEYS.stream("room", room)
    keys = [stream, KEYS.stream_meta("room", room), stream + ":ids"]
    return rc.register_script(PUBLISH_SCRIPT.text)(
        keys=keys, args=[KEYS.room_channel(room), envelope, envelope_id, size, 300, "fresh-epoch"])


def foreign(room: str, envelope_id: str, msg: dict[str, Any], version: int = 1) -> bytes:
    """An envelope as another language's publisher packs it."""
    env = {"v": version, "id": envelope_id, "origin": "pub:go",
           "msg": {"room": room, "timestamp": int(time.time()), **msg}}
    return msgpack.packb(env, use_bin_type=True)  # type: ignore[no-any-return]


async def replay_from(session: aiohttp.ClientSession, node: NodeProcess, room: str, since: dict[str, Any]
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A new client joins with since: (the frames before its ack, the ack)."""
    client = await Client.open(session, node.ws_url)
    try:
        await client.send({"type": "join_room", "id": "j", "data": {"room": room, "since": since}})
        frames: list[dict[str, Any]] = []
        while True:
            frame = await client.recv()
            if frame["type"] in ("ack", "error") and frame.get("id") == "j":
                return frames, frame
            frames.append(frame)
    finally:
        await client.close()


def test_the_lua_script_refuses_an_envelope_past_its_bound_before_writing(rc: redis.Redis) -> None:
    """An envelope whose map cannot take the two position fields is refused, and leaves no hole:
    the next message takes the next offset."""
    room = "lua-bound"
    assert script_publish(rc, room, foreign(room, "a", {"type": "m"}), "a", SIZE)[1] == 1
    full = b"\xde\xff\xfe" + b"".join(msgpack.packb(f"k{i}") + b"\x00" for i in range(65534))
    with pytest.raises(redis.ResponseError):
        script_publish(rc, room, full, "full")
    assert rc.hget(KEYS.stream_meta("room", room), "offset") == b"1"
    assert script_publish(rc, room, foreign(room, "b", {"type": "m"}), "b")[1] == 2
    entries = cast(list[Any], rc.xrange(KEYS.stream("room", room)))
    assert [entry_id for entry_id, _ in entries] == [b"1-1", b"2-1"]


async def test_a_publisher_retry_after_other_publishes_is_stored_and_delivered_once(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """A publish whose reply was lost is sent again after another publisher's message: it keeps its
    first offset; live members see no gap, a replay and the history no duplicate."""
    room = "retry"
    member = await Client.open(session, redis_node.ws_url)
    await member.join(room)
    first = prepare(Target("room", room), {"type": "m", "data": "first"}, pub.origin, pub.keys)
    step = publish_call(first, pub.keys, pub.history_policy)
    run_step(rc, step)  # its reply is lost: the publisher will send it again
    pub.broadcast_to_room(room, {"type": "m", "data": "second"})
    assert run_step(rc, step)[1] == 1  # the retry: answered with the first copy's offset
    pub.broadcast_to_room(room, {"type": "m", "data": "third"})
    live = await recv_n(member, 3)
    await member.close()
    expected = [(1, "first"), (2, "second"), (3, "third")]
    assert [(f["offset"], f["data"]) for f in live] == expected
    replay, ack = await replay_from(session, redis_node, room, {"offset": 0, "epoch": live[0]["epoch"]})
    assert [(f["offset"], f["data"]) for f in replay] == expected
    assert ack["data"] == {"recovered": True, "offset": 3, "epoch": live[0]["epoch"]}
    assert [(m["offset"], m["data"]) for m in pub.history(room).messages] == expected


def test_a_publisher_batch_sent_again_whole_is_stored_once(pub: Publisher, rc: redis.Redis) -> None:
    """publish_many's pipeline, sent again after a lost reply, appends nothing the second time."""
    room = "batch-retry"
    batch = prepare_many([(Target("room", room), {"type": "m", "data": i}) for i in range(3)], pub.origin, pub.keys)
    steps: list[Step] = []

    def execute(step: Step) -> Any:
        steps.append(step)
        return run_step(rc, step)

    drive(publish_query(batch, pub.keys, pub.history_policy), execute)
    assert len(steps) == 1
    run_step(rc, steps[0])  # what a retry after a timeout does
    history = pub.history(room)
    assert (history.offset, [(m["offset"], m["data"]) for m in history.messages]) == (3, [(1, 0), (2, 1), (3, 2)])


async def test_a_history_read_skips_what_json_cannot_carry_and_answers_200(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """A stored message with msgpack binary data (no JSON form; never delivered live) is left out of
    GET /api/rooms/<room>/history, which answers 200 with the rest."""
    room = "bin"
    pub.broadcast_to_room(room, {"type": "m", "data": "before"})
    assert script_publish(rc, room, foreign(room, "bin-1", {"type": "blob", "data": b"\x00\x01"}), "bin-1")[1] == 2
    pub.broadcast_to_room(room, {"type": "m", "data": "after"})
    async with session.get(f"{redis_node.url}/api/rooms/{room}/history") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["offset"] == 3
    assert [(m["offset"], m["data"]) for m in body["messages"]] == [(1, "before"), (3, "after")]


async def test_paging_a_history_read_past_a_skipped_message_reaches_the_rest(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """A client pages with since=<the last offset it got>&limit=1: the message JSON cannot carry
    must not stop it short of the messages above it."""
    room = "bin-pages"
    pub.broadcast_to_room(room, {"type": "m", "data": "before"})
    script_publish(rc, room, foreign(room, "bin-2", {"type": "blob", "data": b"\x00"}), "bin-2")
    pub.broadcast_to_room(room, {"type": "m", "data": "after"})
    got: list[int] = []
    since = 0
    for _ in range(3):
        async with session.get(f"{redis_node.url}/api/rooms/{room}/history?since={since}&limit=1") as resp:
            assert resp.status == 200
            body = await resp.json()
        if not body["messages"]:
            break
        got += [m["offset"] for m in body["messages"]]
        since = got[-1]
    assert got == [1, 3], f"paging stopped at since={since}: {body}"


async def test_a_stored_message_the_node_cannot_decode_keeps_its_place_without_a_recovery_loop(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """An entry of an unknown envelope version (stored by another language's publisher through the
    shipped script) is dropped live and in replays, and the next message is no gap: the member gets
    it at once and the node reads nothing back."""
    room = "v2"
    member = await Client.open(session, redis_node.ws_url)
    await member.join(room)
    recoveries = await metric(session, redis_node.url, "hubnode_history_recoveries_total")
    pub.broadcast_to_room(room, {"type": "m", "data": "before"})
    script_publish(rc, room, foreign(room, "v2-1", {"type": "m", "data": "from v2"}, version=2), "v2-1")
    for i in range(3):
        pub.broadcast_to_room(room, {"type": "m", "data": f"after {i}"})
    live = await recv_n(member, 4)
    await member.close()
    assert [f["offset"] for f in live] == [1, 3, 4, 5]
    assert await metric(session, redis_node.url, "hubnode_history_recoveries_total") == recoveries
    replay, ack = await replay_from(session, redis_node, room, {"offset": 0, "epoch": live[0]["epoch"]})
    assert [f["offset"] for f in replay] == [1, 3, 4, 5]
    assert ack["data"] == {"recovered": True, "offset": 5, "epoch": live[0]["epoch"]}


async def test_a_stored_reserved_type_never_reaches_a_client(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """A forged `ack` stored in a room's stream through the shipped script reaches no client: not
    live, not through the recovery of the gap it would leave, not in a join's replay."""
    room = "forged"
    member = await Client.open(session, redis_node.ws_url)
    await member.join(room)
    pub.broadcast_to_room(room, {"type": "m", "data": "before"})
    script_publish(rc, room, foreign(room, "forged", {"type": "ack", "id": 7}), "forged")
    pub.broadcast_to_room(room, {"type": "m", "data": "after"})
    pub.broadcast_to_room(room, {"type": "m", "data": "last"})  # whatever came before it has arrived with it
    live = await recv_n(member, 3)
    await member.close()
    assert [(f["type"], f.get("offset")) for f in live] == [("m", 1), ("m", 3), ("m", 4)]
    replay, ack = await replay_from(session, redis_node, room, {"offset": 0, "epoch": live[0]["epoch"]})
    assert [(f["type"], f.get("offset")) for f in replay] == [("m", 1), ("m", 3), ("m", 4)]
    assert ack["data"] == {"recovered": True, "offset": 4, "epoch": live[0]["epoch"]}


async def test_a_history_read_leaves_out_a_stored_reserved_type(
        redis_node: NodeProcess, pub: Publisher, rc: redis.Redis, session: aiohttp.ClientSession) -> None:
    """GET /api/rooms/<room>/history answers the messages "as clients received them": a forged `ack`
    that no client received is not among them."""
    room = "forged-read"
    pub.broadcast_to_room(room, {"type": "m", "data": "before"})
    script_publish(rc, room, foreign(room, "forged-2", {"type": "ack", "id": 7}), "forged-2")
    pub.broadcast_to_room(room, {"type": "m", "data": "after"})
    async with session.get(f"{redis_node.url}/api/rooms/{room}/history") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["offset"] == 3
    assert [(m["type"], m["offset"]) for m in body["messages"]] == [("m", 1), ("m", 3)]
