"""Hardening of 0.1 against real Redis and real nodes: each test names one defect it closes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from hubnode import Node, create_app
from hubnode.membership.redis import STEP, RedisMembershipStore
from publisher import Publisher
from publisher.keys import Keys
from tests.conftest import node_config, start_server
from tests.helpers import Client, RedisServer, membership_of, redis_state, sync_redis, wait_until


@pytest.fixture
async def redis_hub(redis_server: RedisServer, prefix: str) -> AsyncIterator[TestServer]:
    """One in-process node in cluster mode, built from its Config alone."""
    server = await start_server(node_config(redis_url=redis_server.url, key_prefix=prefix, heartbeat=0.5,
                                            max_connections_per_user=5, redis_timeout=1.0))
    yield server
    await server.close()


def node_of(server: TestServer) -> Node:
    from hubnode.appkey import NODE

    return server.app[NODE]


def raw_envelope(msg: dict[str, object], mid: str) -> bytes:
    return msgpack.packb({"v": 1, "id": mid, "origin": "pub:other-language", "msg": msg})


async def lobby_member(hub: TestServer, session: aiohttp.ClientSession, redis_server: RedisServer,
                       prefix: str) -> tuple[Client, aioredis.Redis, str]:
    """A client in room "lobby", a raw Redis client, and the lobby's channel, for publishing by hand."""
    a = await Client.open(session, str(hub.make_url("/ws?user_id=alice")))
    await a.join("lobby")
    return a, aioredis.Redis.from_url(redis_server.url), Keys(prefix).room_channel("lobby")


async def test_a_node_configured_with_a_redis_url_runs_on_redis(
        redis_hub: TestServer, redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """Node(Config(redis_url=...)) keeps its membership in Redis and takes messages from other publishers."""
    node = node_of(redis_hub)
    assert type(node.broker).__name__ == "RedisBroker" and type(node.store).__name__ == "RedisMembershipStore"
    a = await Client.open(session, str(redis_hub.make_url("/ws?user_id=alice")))
    await a.join("lobby")
    r = sync_redis(redis_server.url)
    assert membership_of(redis_state(r, prefix), prefix) == {"lobby": {a.conn_id: "alice"}}
    with Publisher(redis_server.url, key_prefix=prefix) as pub:
        assert pub.broadcast_to_room("lobby", {"type": "from-worker"}) == 1
    assert (await a.recv_type("from-worker"))["room"] == "lobby"
    r.close()


async def test_reserved_types_from_redis_are_dropped_and_counted(
        redis_hub: TestServer, redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """A raw envelope of type ack/error/pong/connected never reaches a client; the drop is counted."""
    a, r, channel = await lobby_member(redis_hub, session, redis_server, prefix)
    for i, mtype in enumerate(("ack", "error", "pong", "connected")):
        await r.publish(channel, raw_envelope({"type": mtype, "id": "j", "data": None}, f"forged-{i}"))
    await r.publish(channel, raw_envelope({"type": "after"}, "fine-1"))
    assert (await a.recv())["type"] == "after"  # nothing forged came before it
    assert node_of(redis_hub).counters.reserved == 4
    metrics = await (await session.get(redis_hub.make_url("/metrics"))).text()
    assert "hubnode_reserved_type_drops_total 4.0" in metrics
    await r.aclose()


async def test_same_envelope_published_three_times_is_delivered_once(
        redis_hub: TestServer, redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """A republished envelope id (a publisher's retry) is delivered once and counted as a duplicate."""
    a, r, channel = await lobby_member(redis_hub, session, redis_server, prefix)
    for _ in range(3):
        await r.publish(channel, raw_envelope({"type": "once", "data": 1}, "same-id"))
    await r.publish(channel, raw_envelope({"type": "next", "data": 2}, "other-id"))
    assert [(await a.recv())["type"], (await a.recv())["type"]] == ["once", "next"]
    assert node_of(redis_hub).counters.duplicates == 2
    await r.aclose()


async def test_concurrent_handshakes_cannot_pass_the_per_user_limit(
        redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """40 concurrent handshakes of one user, split over two cluster-mode nodes with limit 5: exactly 5 upgrade."""
    servers = [await start_server(node_config(node_id=f"n{i}", redis_url=redis_server.url, key_prefix=prefix,
                                              max_connections_per_user=5, heartbeat=0.5)) for i in (1, 2)]
    try:
        async def attempt(i: int) -> aiohttp.ClientWebSocketResponse | int:
            try:
                return await session.ws_connect(str(servers[i % 2].make_url("/ws?user_id=mallory")))
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

        results = await asyncio.gather(*(attempt(i) for i in range(40)))
        opened = [r for r in results if not isinstance(r, int)]
        assert len(opened) == 5 and sorted({r for r in results if isinstance(r, int)}) == [429]
        r = sync_redis(redis_server.url)
        assert r.hlen(Keys(prefix).online("mallory")) == 5
        for ws in opened:
            await ws.close()
        await wait_until(lambda: r.hlen(Keys(prefix).online("mallory")) == 0, what="the count to drop to 0")
        r.close()
    finally:
        for server in servers:
            await server.close()


async def test_concurrent_handshakes_cannot_pass_the_node_limit(session: aiohttp.ClientSession) -> None:
    """40 concurrent handshakes against --max-connections 5: exactly 5 upgrade, the rest get 503."""
    server = await start_server(node_config(max_connections=5))
    try:
        async def attempt(i: int) -> aiohttp.ClientWebSocketResponse | int:
            try:
                return await session.ws_connect(str(server.make_url(f"/ws?user_id=u{i}")))
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

        results = await asyncio.gather(*(attempt(i) for i in range(40)))
        opened = [r for r in results if not isinstance(r, int)]
        assert len(opened) == 5 and {r for r in results if isinstance(r, int)} == {503}
        for ws in opened:
            await ws.close()
    finally:
        await server.close()


async def test_a_crashed_membership_writer_is_logged_counted_unready_and_restarted(
        redis_hub: TestServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer dying mid-batch fails its callers (no hang), logs at ERROR, turns /readyz 503, then restarts."""
    node = node_of(redis_hub)
    store = node.store
    assert isinstance(store, RedisMembershipStore)
    node.supervisor.restart_delay = 2.0
    real_send = store._send

    async def crash_once(batch: list[object]) -> None:
        monkeypatch.setattr(store, "_send", real_send)
        raise RuntimeError("writer bug")

    monkeypatch.setattr(store, "_send", crash_once)
    with caplog.at_level(logging.ERROR, logger="hubnode.supervisor"):
        async with asyncio.timeout(5):  # the connect's write was in the crashed batch: it must not hang
            a = await Client.open(session, str(redis_hub.make_url("/ws")))  # anonymous: no limit to check
        ready = await session.get(redis_hub.make_url("/readyz"))
        assert ready.status == 503 and "membership-writer" in (await ready.json())["reason"]
    assert any("membership-writer" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)
    await wait_until(lambda: node.ready, what="the writer to be restarted")
    metrics = await (await session.get(redis_hub.make_url("/metrics"))).text()
    assert 'hubnode_task_crashes_total{task="membership-writer"} 1.0' in metrics
    await a.join("after-restart")  # writes flow again (the failed one is reconciled by re-registration)
    assert [m.conn_id for m in await node.room_clients("after-restart")] == [a.conn_id]


async def test_membership_writes_have_a_deadline_when_redis_stalls(redis_server: RedisServer, prefix: str) -> None:
    """With Redis paused, a membership update returns after the timeout, counted as failed, instead of hanging."""
    store = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "n1", timeout=0.5)
    await store.start(lambda: [])
    r = sync_redis(redis_server.url)
    r.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    try:
        started = time.monotonic()
        async with asyncio.timeout(2.5):
            assert await store.add_connection("n1:1", "u") is None  # unknown: failed, reconciled later
        assert store.counters.failed_updates == 1 and time.monotonic() - started < 2.5
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        r.close()
        await store.close()


async def test_draining_a_node_closes_all_its_redis_connections(redis_server: RedisServer, prefix: str) -> None:
    """After a drain no connection of the node (pooled command sockets, subscriber) is left open on Redis."""
    config = node_config(node_id="leaky", redis_url=redis_server.url, key_prefix=prefix, heartbeat=0.5)
    server = await start_server(config)
    r = sync_redis(redis_server.url)

    def named() -> list[str]:
        return [c["name"] for c in r.client_list() if c["name"].startswith("hubnode:leaky:")]

    await wait_until(lambda: {n.rsplit(":", 1)[1] for n in named()} >= {"cmd", "pub", "sub"},
                     what="the node's connections")
    await server.close()
    await wait_until(lambda: not named(), what="every connection of the node to close")
    r.close()


async def test_static_files_are_read_once_not_per_request(monkeypatch: pytest.MonkeyPatch,
                                                         session: aiohttp.ClientSession) -> None:
    """Pages are served from memory: a request never reads the disk."""
    server = TestServer(create_app(node_config()), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        def no_disk(self: Path) -> bytes:
            raise AssertionError(f"read {self} during a request")

        monkeypatch.setattr(Path, "read_bytes", no_disk)
        resp = await session.get(server.make_url("/hub.js"))
        assert resp.status == 200 and "class" in await resp.text()
    finally:
        await server.close()


async def test_sweep_of_a_large_room_runs_in_bounded_steps(redis_server: RedisServer, prefix: str) -> None:
    """A dead node with 3,000 members in one room is swept by many small scripts, leaving Redis exact."""
    keys = Keys(prefix)
    client = aioredis.Redis.from_url(redis_server.url)
    dead = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "dead", heartbeat=0.001)
    live = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "live", heartbeat=60)
    members = [(f"dead:{i}", f"u{i}", frozenset({"big"})) for i in range(3000)]
    await dead.start(lambda: members)
    await live.start(lambda: [("live:1", "u0", frozenset({"big"}))])
    await dead._tasks.close()  # the dead node stops writing, as a crashed process would
    before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert await live.sweep(int(time.time() * 1000) + 60_000) == ["dead"]
    calls = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] - before
    assert calls >= 3000 // STEP + 3000  # the room in steps of STEP, then each user's online hash
    r = sync_redis(redis_server.url)
    state = redis_state(r, prefix)
    assert membership_of(state, prefix) == {"big": {"live:1": "u0"}}
    assert [k for k in state if k.startswith(f"{prefix}online:")] == [keys.online("u0")]
    assert state[keys.online("u0")] == {"live:1": "live"}
    assert not [k for k in state if k.startswith(keys.node("dead"))]
    r.close()
    await live.close()
    await dead.redis.aclose()
    await client.aclose()


def test_bad_hubctl_publish_of_a_reserved_type_is_refused(redis_server: RedisServer) -> None:
    """hubctl publish --type ack exits 2 with one line, sending nothing."""
    out = subprocess.run([sys.executable, "-m", "publisher.cli", "--redis-url", redis_server.url, "publish",
                          "--all", "--type", "ack"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "reserved" in out.stderr and len(out.stderr.splitlines()) == 1


async def test_http_broadcast_and_hub_api_refuse_reserved_types(session: aiohttp.ClientSession) -> None:
    """POST /broadcast answers 400 and the Hub API raises for a node-only type."""
    server = await start_server(node_config())
    try:
        resp = await session.post(server.make_url("/broadcast"), json={"type": "pong", "data": 1})
        assert resp.status == 400 and "reserved" in (await resp.json())["error"]["message"]
        with pytest.raises(ValueError, match="reserved"):
            await node_of(server).broadcast_to_all({"type": "connected"})
    finally:
        await server.close()


async def test_edges_read_what_the_interfaces_give(session: aiohttp.ClientSession) -> None:
    """/metrics and /api/nodes come from Broker.counters and MembershipStore.nodes(), whatever the implementation."""
    from hubnode.broker.base import BrokerCounters
    from hubnode.broker.memory import MemoryBroker
    from hubnode.membership.base import NodeInfo
    from hubnode.membership.memory import MemoryMembershipStore

    class CountingBroker(MemoryBroker):
        @property
        def counters(self) -> BrokerCounters:
            return BrokerCounters(reconnects=7, probe_failures=3)

    class RegistryStore(MemoryMembershipStore):
        async def nodes(self) -> list[NodeInfo]:
            return [NodeInfo("a", 1, 5.0), NodeInfo("b", 2, 6.0)]

    config = node_config()
    node = Node(config, broker=CountingBroker(), store=RegistryStore(config.node_id))
    server = TestServer(create_app(config, node=node), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        metrics = await (await session.get(server.make_url("/metrics"))).text()
        assert "hubnode_redis_reconnects_total 7.0" in metrics and "hubnode_redis_probe_failures_total 3.0" in metrics
        nodes = await (await session.get(server.make_url("/api/nodes"))).json()
        assert [n["id"] for n in nodes["nodes"]] == ["a", "b"]
    finally:
        await server.close()


def test_the_edges_import_without_the_app_module() -> None:
    """ws and http_api find the node through hubnode.appkey: importing them does not import hubnode.app."""
    code = "import sys, hubnode.ws, hubnode.http_api; assert 'hubnode.app' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_node_that_comes_back_mid_sweep_rebuilds_its_entries(redis_server: RedisServer, prefix: str) -> None:
    """The first sweep step claims the node, so if it wakes up half-swept it notices and re-registers exactly."""
    keys = Keys(prefix)
    table = [(f"a:{i}", f"u{i % 3}", frozenset({"lobby"})) for i in range(10)]
    a = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "a", heartbeat=0.5)
    b = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "b", heartbeat=0.5)
    await a.start(lambda: table)
    await b.start(lambda: [])
    r = sync_redis(redis_server.url)
    expired = int(time.time() * 1000) - 1
    r.hset(keys.node("a"), "expiry", expired)  # a was paused: its entry expired
    r.zadd(keys.nodes, {"a": expired})
    reached, gate = asyncio.Event(), asyncio.Event()
    real_call = b._call

    async def pause_between_steps(name: str, *args: object, **kw: object) -> object:
        if name == "purge_next" and args[1][2] == "hash":  # type: ignore[index]
            # the rooms are already purged; the sweeper stalls before the users
            reached.set()
            await gate.wait()
        return await real_call(name, *args, **kw)  # type: ignore[arg-type]

    b._call = pause_between_steps  # type: ignore[method-assign]
    sweeping = asyncio.ensure_future(b.sweep())
    await reached.wait()
    await a.heartbeat()  # a wakes up: it finds itself claimed and re-registers
    gate.set()
    assert await sweeping == []  # the sweep stopped: a is alive
    state = redis_state(r, prefix)
    assert membership_of(state, prefix) == {"lobby": {conn: user for conn, user, _ in table}}
    assert {u: len(state[keys.online(u)]) for u in ("u0", "u1", "u2")} == {"u0": 4, "u1": 3, "u2": 3}
    assert r.hget(keys.node("a"), "clients") == "10" and r.scard(keys.node_conns("a")) == 10
    r.close()
    await a.close()
    await b.close()


async def test_a_long_reregistration_renews_its_expiry_and_is_not_swept(redis_server: RedisServer, prefix: str) -> None:
    """Each re-registration step pushes the node's expiry forward, so peers never sweep it while it registers."""
    keys = Keys(prefix)
    table = [(f"a:{i}", f"u{i}", frozenset({f"room{i}"})) for i in range(600)]
    a = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), keys, "a", heartbeat=0.1)
    await a.start(lambda: table)
    r = sync_redis(redis_server.url)
    expiries: list[float] = []
    real_call = a._call

    async def watch(name: str, *args: object, **kw: object) -> object:
        if name.startswith("register_"):
            expiries.append(r.zscore(keys.nodes, "a") or 0)
            await asyncio.sleep(0.05)  # a slow Redis: the whole job outlasts the 0.3 s expiry many times over
        return await real_call(name, *args, **kw)  # type: ignore[arg-type]

    a._call = watch  # type: ignore[method-assign]
    r.zrem(keys.nodes, "a")  # lost: the next heartbeat re-registers
    await a.heartbeat()
    assert len(expiries) >= 8 and expiries == sorted(expiries) and expiries[-1] > expiries[1]
    assert r.hget(keys.node("a"), "clients") == "600" and r.scard(keys.node_rooms("a")) == 600
    assert all(r.hlen(keys.members(f"room{i}")) == 1 for i in range(600))
    assert a.counters.registrations == 2
    r.close()
    await a.close()


async def test_the_per_user_limit_is_checked_while_a_reregistration_is_pending(
        redis_server: RedisServer, prefix: str) -> None:
    """After a failed update the store still checks the limit in Redis; it never admits blindly."""
    store = RedisMembershipStore(aioredis.Redis.from_url(redis_server.url), Keys(prefix), "a", heartbeat=2.0)
    await store.start(lambda: [])
    assert [await store.add_connection(f"a:{i}", "alice", 2) for i in range(3)] == [True, True, False]
    store._dirty = True  # as after a failed update, until the next heartbeat
    assert [await store.add_connection(f"a:{i}", "alice", 2) for i in range(10, 13)] == [False, False, False]
    r = sync_redis(redis_server.url)
    assert r.hlen(Keys(prefix).online("alice")) == 2
    r.close()
    await store.close()


async def test_a_channel_released_during_a_reconnect_is_not_left_subscribed(
        redis_server: RedisServer, prefix: str) -> None:
    """A release that falls due while the broker resubscribes after a loss is carried out once it is back."""
    from hubnode.broker.redis import RedisBroker
    from hubnode.routing import Change
    from hubnode.subscriptions import Subscriptions

    keys = Keys(prefix)
    broker = RedisBroker(redis_server.url, aioredis.Redis.from_url(redis_server.url), keys, "n1",
                         timeout=2.0, probe_interval=0.5)
    in_use: set[str] = set()
    subs = Subscriptions(broker, in_use.__contains__, grace=0.2, pinned=(keys.all, keys.node_channel("n1")))
    await broker.start(lambda channel, payload: None, wanted=subs.wanted)
    hot = keys.room_channel("hot")
    in_use.add(hot)
    await subs.apply(Change(subscribe=(hot,)))
    in_use.discard(hot)
    subs.release([hot])  # the last member left: released after the grace period
    gate = asyncio.Event()
    real_subscribe_on = broker._subscribe_on

    async def held(conn: object, channels: list[str]) -> None:
        await gate.wait()  # the reconnect's SUBSCRIBE round trip, held open
        await real_subscribe_on(conn, channels)  # type: ignore[arg-type]

    broker._subscribe_on = held  # type: ignore[method-assign]
    r = aioredis.Redis.from_url(redis_server.url)
    await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_until(lambda: hot not in subs.wanted(), what="the release to fall due while reconnecting")
    gate.set()
    await wait_until(lambda: broker.connected, what="the broker to reconnect")
    await wait_until(lambda: _numsub_zero(r, hot), what="the released channel to be unsubscribed")
    await subs.close()
    await broker.close()
    await r.aclose()


async def _numsub_zero(r: aioredis.Redis, channel: str) -> bool:
    return (await r.pubsub_numsub(channel))[0][1] == 0


async def test_a_node_not_registered_in_redis_is_not_ready(
        redis_server: RedisServer, prefix: str, session: aiohttp.ClientSession) -> None:
    """/readyz is 503 while the node's entry is missing (it would refuse limited users), 200 once re-registered."""
    server = await start_server(node_config(redis_url=redis_server.url, key_prefix=prefix, heartbeat=60))
    node = node_of(server)
    r = sync_redis(redis_server.url)
    try:
        assert (await session.get(server.make_url("/readyz"))).status == 200
        r.delete(Keys(prefix).node(node.id))  # swept or lost; no heartbeat comes for a minute
        a = await Client.open(session, str(server.make_url("/ws")))
        await a.join("r")  # the join's script answers "not registered"
        ready = await session.get(server.make_url("/readyz"))
        assert ready.status == 503 and "not registered" in (await ready.json())["reason"]
        await node.store.heartbeat()  # the heartbeat re-registers the node with its members
        assert (await session.get(server.make_url("/readyz"))).status == 200
        assert [m.conn_id for m in await node.room_clients("r")] == [a.conn_id]
    finally:
        r.close()
        await server.close()
