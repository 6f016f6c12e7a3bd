"""Hardening of 0.1, at the level of each piece: supervision, dedup, the reserved-type rule, forks, bounds."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from hubnode.broker.base import BrokerUnavailable
from hubnode.broker.memory import MemoryBroker
from hubnode.broker.redis import RedisBroker
from hubnode.dedup import RecentIds
from hubnode.protocol import unavailable_message
from hubnode.routing import RoutingTable
from hubnode.subscriptions import Subscriptions
from hubnode.supervisor import Supervisor
from publisher import Publisher
from publisher.envelope import MAX_ENVELOPE_BYTES, new_message_id, unpack
from publisher.keys import Keys
from publisher.message import RESERVED_TYPES, Message, MessageError
from publisher.targets import Target, envelope_for
from tests.helpers import wait_until

LUA = Path(__file__).resolve().parents[2] / "hubnode" / "membership" / "lua"


# -- supervision ------------------------------------------------------------------

async def test_supervisor_logs_counts_marks_down_and_restarts_a_crashed_task(caplog: pytest.LogCaptureFixture) -> None:
    """A crash is logged at ERROR, counted, makes the supervisor unhealthy, and the task runs again."""
    sup = Supervisor(restart_delay=0.2)
    runs: list[int] = []
    hold = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await hold.wait()

    with caplog.at_level(logging.ERROR, logger="hubnode.supervisor"):
        sup.spawn("flaky", flaky)
        await wait_until(lambda: sup.crashes["flaky"] == 1, what="the crash to be counted")
        assert not sup.healthy and sup.down == {"flaky"}
        await wait_until(lambda: len(runs) == 2, what="the restart")
    assert sup.healthy and sup.running("flaky")
    assert any(r.levelno == logging.ERROR and "flaky" in r.getMessage() and r.exc_info for r in caplog.records)
    await sup.close()
    assert not sup.running("flaky")


async def test_supervisor_does_not_restart_a_task_that_finished_or_was_stopped() -> None:
    """A task that returns is done; a stopped one stays stopped; neither counts as a crash."""
    sup = Supervisor(restart_delay=0.01)
    runs: list[str] = []

    async def once() -> None:
        runs.append("once")

    async def forever() -> None:
        runs.append("forever")
        await asyncio.Event().wait()

    sup.spawn("once", once)
    sup.spawn("forever", forever)
    await wait_until(lambda: len(runs) == 2, what="both tasks to run")
    await sup.stop("forever")
    await wait_until(lambda: not sup.running("once"), what="the finished task to be gone")
    assert not sup.running("forever") and sup.healthy and not sup.crashes and sup._restarts == {}
    await sup.close()


# -- envelope ids -----------------------------------------------------------------

def test_recent_ids_drop_repeats_within_the_window_and_forget_after_it() -> None:
    """An id is a duplicate inside the window; after the window, or past max_ids, it is new again."""
    ids = RecentIds(window=60, max_ids=4)
    assert not ids.seen("a", 0) and ids.seen("a", 59.9) and not ids.seen("a", 120.0)
    assert not ids.seen("b", 150.0) and ids.seen("a", 179.9) and ids.seen("b", 209.9)
    for name in ("c", "d", "e", "f"):
        assert not ids.seen(name, 210.0)
    assert len(ids) <= 4 and not ids.seen("b", 210.0)  # past max_ids the oldest are forgotten first
    assert not ids.seen("", 121.0) and not ids.seen("", 121.0)  # no id, no deduplication


def test_message_ids_differ_in_a_forked_child() -> None:
    """A child process draws its own envelope-id prefix and default origin (Celery prefork)."""
    pub = Publisher(client=fakeredis.FakeRedis())
    parent_id, parent_origin = new_message_id(), pub.origin
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        os.write(write, f"{new_message_id()} {pub.origin}".encode())
        os._exit(0)
    os.close(write)
    child_id, child_origin = os.read(read, 1000).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_id.split("-")[0] != parent_id.split("-")[0]
    assert child_origin != parent_origin and child_origin.startswith("pub:")
    assert Publisher(client=fakeredis.FakeRedis(), origin_id="w1").origin == "pub:w1"


class FlakyRedis(fakeredis.FakeRedis):
    """A client whose first publish times out after reaching Redis.

    Rooms and users publish through the history script (EVALSHA), `all` with PUBLISH.
    """

    fail = 1

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return self._flaky(super().publish(channel, message, **kwargs))

    def evalsha(self, *args: Any) -> Any:
        return self._flaky(super().evalsha(*args))

    def _flaky(self, reply: Any) -> Any:
        if FlakyRedis.fail:
            FlakyRedis.fail -= 1
            raise redis.TimeoutError("timed out after sending")
        return reply


def test_publisher_retry_resends_the_same_envelope_id() -> None:
    """With retries, a timed-out PUBLISH is sent again with the same bytes, so nodes can drop the repeat."""
    client = FlakyRedis()
    sub = client.pubsub()
    sub.subscribe("hub:room:{r}")
    sub.get_message(timeout=1)
    with Publisher(client=client, retries=1) as pub:
        pub.broadcast_to_room("r", {"type": "t"})
    seen = [unpack(m["data"]).id for m in iter(lambda: sub.get_message(timeout=0.2), None)]
    assert len(seen) == 2 and seen[0] == seen[1]
    FlakyRedis.fail = 1
    with Publisher(client=FlakyRedis()) as pub, pytest.raises(redis.TimeoutError):
        pub.broadcast_to_room("r", {"type": "t"})  # no retries: the error reaches the caller


def test_unavailable_says_may_have_been_published_only_when_that_is_true() -> None:
    """'nothing was published' only when nothing left the node."""
    assert "nothing was published" in unavailable_message(False)
    assert "may have been published" in unavailable_message(True)


async def test_redis_broker_publish_timeout_is_maybe_published() -> None:
    """A PUBLISH that timed out is reported as possibly published, and never resent."""
    class Timing:
        calls = 0

        async def publish(self, channel: str, payload: bytes) -> int:
            Timing.calls += 1
            raise redis.TimeoutError("no answer")

    broker = RedisBroker("redis://127.0.0.1:1/0", Timing(), Keys(), "n1")  # type: ignore[arg-type]
    broker._up.set()  # as if the subscriber were connected
    with pytest.raises(BrokerUnavailable) as info:
        await broker.publish("hub:all", b"x")
    assert info.value.maybe_published and Timing.calls == 1


# -- the reserved-type rule ----------------------------------------------------------

@pytest.mark.parametrize("mtype", sorted(RESERVED_TYPES))
def test_every_publish_path_refuses_reserved_types(mtype: str) -> None:
    """The node's own answer types cannot be packed, so no publisher, HTTP call or Hub API call sends one."""
    with pytest.raises(MessageError, match="reserved"):
        envelope_for(Target("room", "r"), Message(mtype, {}), "n1", Keys())
    with Publisher(client=fakeredis.FakeRedis()) as pub, pytest.raises(MessageError, match="reserved"):
        pub.broadcast_to_user("u", {"type": mtype, "data": 1})


def test_publisher_refuses_an_envelope_over_the_size_nodes_accept() -> None:
    """A payload larger than MAX_ENVELOPE_BYTES is refused before it is sent."""
    with Publisher(client=fakeredis.FakeRedis()) as pub, pytest.raises(MessageError, match="over the limit"):
        pub.broadcast_to_all({"type": "big", "data": "x" * MAX_ENVELOPE_BYTES})


# -- the broker's hand-off bounds ------------------------------------------------------

async def test_handoff_is_bounded_by_bytes_and_payload_size_then_resyncs() -> None:
    """Over the byte bound or the payload bound, publications are dropped, counted, and a resync follows."""
    got: list[bytes] = []
    resyncs: list[int] = []
    broker = RedisBroker("redis://127.0.0.1:1/0", None, Keys(), "n1",  # type: ignore[arg-type]
                         max_pending_bytes=10_000, max_payload_bytes=4_000)
    broker._handler = lambda channel, payload: got.append(payload)
    broker._on_resync = lambda: resyncs.append(1)
    for _ in range(20):  # 20 kB offered in one socket read: only 10 kB may wait
        broker._on_push([b"message", b"hub:all", b"x" * 1000])
    broker._on_push([b"message", b"hub:all", b"y" * 5000])
    await wait_until(lambda: resyncs, what="the resync after the drops")
    assert len(got) == 10 and broker.counters.overflows == 10 and broker.counters.oversized == 1
    assert resyncs == [1] and broker._pending_bytes == 0


# -- one owner of subscriptions ---------------------------------------------------------

class GatedBroker(MemoryBroker):
    """A memory broker whose SUBSCRIBE waits for a gate, and which records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def subscribe(self, channels: Any) -> None:
        channels = tuple(channels)
        self.calls.append(("subscribe", channels))
        await self.gate.wait()
        await super().subscribe(channels)

    async def unsubscribe(self, channels: Any) -> None:
        channels = tuple(channels)
        self.calls.append(("unsubscribe", channels))
        await super().unsubscribe(channels)


async def test_table_change_drives_subscribing_and_a_late_release_is_not_forgotten() -> None:
    """Only a channel's first member subscribes it; a release due while SUBSCRIBE is in flight happens after."""
    keys = Keys()
    broker = GatedBroker()
    await broker.start(lambda channel, payload: None)
    table = RoutingTable(keys)
    subs = Subscriptions(broker, table.in_use, grace=0.01, pinned=[keys.all])
    table.add("c1", None)
    table.add("c2", None)
    room = keys.room_channel("r")
    first = asyncio.ensure_future(subs.apply(table.join("c1", "r"), confirm=[room]))
    second = asyncio.ensure_future(subs.apply(table.join("c2", "r"), confirm=[room]))
    await wait_until(lambda: broker.calls, what="the SUBSCRIBE")
    subs.release(table.leave("c1", "r").release + table.leave("c2", "r").release)  # both gone before the confirm
    due = subs._releasing[room]
    await wait_until(lambda: subs._releasing.get(room, 0) > due, what="the due release to be deferred, not dropped")
    broker.gate.set()
    await asyncio.gather(first, second)
    assert broker.calls[0] == ("subscribe", (room,)) and broker.calls.count(("subscribe", (room,))) == 1
    await wait_until(lambda: ("unsubscribe", (room,)) in broker.calls, what="the deferred release")
    assert subs.wanted() == [keys.all] and room not in broker.channels
    await subs.close()


def test_redis_broker_keeps_no_channel_list_of_its_own() -> None:
    """The broker asks the node's wanted() on reconnect; it has no _wanted set or pinned list to drift."""
    broker = RedisBroker("redis://127.0.0.1:1/0", None, Keys(), "n1")  # type: ignore[arg-type]
    assert not any(isinstance(v, set) and v for v in vars(broker).values() if not isinstance(v, frozenset))


# -- Lua: every key in KEYS ---------------------------------------------------------

def test_no_lua_script_builds_a_key_name() -> None:
    """Scripts receive every key in KEYS: no prefix argument, no concatenated names, no key-like literals."""
    scripts = sorted(LUA.glob("*.lua"))
    assert len(scripts) >= 10
    for path in scripts:
        code = "\n".join(line.split("--")[0] for line in path.read_text().splitlines())
        assert "prefix" not in code, path.name
        assert re.findall(r"'[^']*:[^']*'", code) in ([], ["':*'"]), path.name  # ':*': HSCAN MATCH of node fields
        # only `node .. ':*'`, a field pattern, and in common.lua the presence events' envelope ids
        code = code.replace("id = ev.base .. '.' .. ev.sent", "id = EVENT_ID") if path.name == "common.lua" else code
        assert re.findall(r"\.\.", code) in ([], [".."]), path.name
        uses_keys = "redis.call" not in code or "KEYS[" in code or path.name == "common.lua"
        assert uses_keys, path.name


async def test_supervisor_keeps_a_task_respawned_before_its_predecessor_was_reaped() -> None:
    """A name spawned again right after its task returned keeps its factory: a later crash is still caught."""
    sup = Supervisor(restart_delay=0.01)

    async def finishes() -> None:
        return None

    async def crashes() -> None:
        raise RuntimeError("boom")

    sup.spawn("unsubscribe", finishes)
    await asyncio.sleep(0)  # the first task has returned; its done-callback is still queued
    sup.spawn("unsubscribe", crashes)
    await wait_until(lambda: sup.crashes["unsubscribe"] >= 2, what="the crash to be counted and restarted")
    await sup.close()


def test_only_the_supervisor_starts_long_lived_tasks() -> None:
    """Every create_task in hubnode is the supervisor's, or a short task that is awaited or tracked.

    The allowed ones: a connection's frame worker (it ends when the frames the
    client sent are handled: an idle connection has none), the drain's closers (awaited), store updates (tracked,
    awaited by their caller and by the drain), and the broker's opening of a
    subscriber connection to a shard (bounded by the Redis timeout, awaited
    through a shield by every subscribe that needs it). A new loop must go through
    Supervisor.spawn, or this test names it.

    hubnode.client is not the node: its connection loop (cancelled by close()), the writer of
    each connection (cancelled when the connection ends) and its background requests and
    handlers (tracked, cancelled by close()) are its own.
    """
    root = LUA.parents[1]
    allowed = {("connection.py", "create_task(self._work())"), ("node.py", "c.close(CloseCode.GOING_AWAY"),
               ("node.py", "create_task(coro)"), ("supervisor.py", "factory()"),
               ("redis.py", "ensure_future(open_())"), ("hub.py", "create_task(self._run()"),
               ("hub.py", "create_task(self._write(link))"), ("hub.py", "ensure_future(work)")}
    found = set()
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.search(r"\.(create_task|ensure_future)\(", line) and not line.lstrip().startswith("#"):
                found.add((path.name, next((a for f, a in allowed if f == path.name and a in line), line.strip())))
    assert found == allowed
