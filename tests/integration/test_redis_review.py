"""Regressions for the review of Redis Cluster and Sentinel support (issue 14).

Three defects, each with the test that would have caught it:

- on a Redis Cluster, a publish storm on one shard failed with
  MaxConnectionsError once the shard's pool (32 connections) was busy,
  instead of queueing as it does on one Redis;
- the node channel had no hash tag, so the node held no subscriber link to
  the shard of its own keys: a failover of that shard went unnoticed, and the
  membership writes it lost were never rewritten;
- a subscriber link to a new shard that failed while opening (a timeout in
  CLIENT SETNAME, or a caller that gave up) marked the whole live set of links
  lost, and every client was resynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from deploy.redis_servers import RedisClusterProcs, RedisProcess, key_slot
from hubnode.broker.base import BrokerUnavailable
from hubnode.broker.redis import RedisBroker
from hubnode.cluster import redis_client, resolve
from hubnode.config import Config
from publisher.envelope import Envelope, pack, unpack
from publisher.history import stream_of
from publisher.keys import Keys
from publisher.message import Message
from publisher.topology import Address
from tests.helpers import Client, NodeProcess, RedisServer, free_port, wait_until

HB = 0.5  # heartbeat of the test node and brokers


class Recorder:
    """A broker's message handler that keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, channel: str, payload: bytes) -> None:
        self.got.append((channel, payload))


def broker_for(config: Config) -> RedisBroker:
    """A RedisBroker built as hubnode.cluster.redis_parts builds a node's (its pool of 32, no retry)."""
    target = resolve(config)
    return RedisBroker(target, redis_client(config, target, retry=False, role="pub"), Keys(config.key_prefix),
                       config.node_id, timeout=config.redis_timeout, probe_interval=config.heartbeat,
                       max_payload_bytes=config.max_envelope_bytes, name=f"hubnode:{config.node_id}:sub")


@contextlib.asynccontextmanager
async def running(broker: RedisBroker, handler: Recorder, resyncs: list[float]) -> AsyncIterator[RedisBroker]:
    await broker.start(handler, lambda: resyncs.append(time.monotonic()))
    try:
        await wait_until(lambda: broker.connected, what="the broker's subscriber to connect")
        yield broker
    finally:
        await broker.close()


def envelope(n: int, room: str) -> tuple[bytes, str]:
    mid = f"m-{n}"
    return pack(Envelope(Message("tick", n, room=room), "pub:review", id=mid)), mid


def shards(cluster: RedisClusterProcs) -> list[tuple[RedisProcess, frozenset[int]]]:
    """Every primary and the slots it serves now."""
    found = []
    for proc in cluster.primaries():
        me = cluster.myself(proc)
        assert me is not None, proc
        found.append((proc, me.slots))
    return found


def shard_of(owned: list[tuple[RedisProcess, frozenset[int]]], key: str) -> RedisProcess:
    slot = key_slot(key.encode())
    return next(proc for proc, slots in owned if slot in slots)


# -- 1. a publish storm on one shard queues ---------------------------------------------------------

async def test_a_publish_storm_on_one_shard_queues_for_connections_instead_of_failing(
        redis_cluster: RedisClusterProcs, prefix: str) -> None:
    """500 concurrent publishes, half with history, to rooms of one shard through a node's broker (a pool of
    32 connections per shard) all go through and are delivered: none fails with MaxConnectionsError."""
    config = Config(redis_url=redis_cluster.url, node_id="storm", key_prefix=prefix, heartbeat=HB)
    keys = Keys(prefix)
    owned = shards(redis_cluster)
    crowded = owned[0][0]
    rooms = [name for name in (f"storm-{n}" for n in range(200)) if shard_of(owned, name) is crowded][:5]
    assert len(rooms) == 5
    got = Recorder()
    resyncs: list[float] = []
    async with running(broker_for(config), got, resyncs) as broker:
        await broker.subscribe([keys.room_channel(room) for room in rooms])

        async def one(n: int) -> int:
            room = rooms[n % len(rooms)]
            payload, mid = envelope(n, room)
            if n % 2:
                return await broker.publish(keys.room_channel(room), payload)
            return await broker.publish_stream(stream_of(keys, "room", room), payload, mid, 1000, 60)

        results = await asyncio.gather(*(one(n) for n in range(500)), return_exceptions=True)
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        assert failed == [], f"{len(failed)} of 500 publishes failed, e.g. {failed[:3]}"
        assert results == [1] * 500, "each publish reached this broker's one subscription"
        await wait_until(lambda: len(got.got) == 500, timeout=10, what="the 500 messages to be delivered")
        assert sorted(unpack(payload).msg.data for _, payload in got.got) == list(range(500))
        for room in rooms:  # the history publishes (even n) were each appended once
            assert (await broker.read_stream(stream_of(keys, "room", room), -1)).top == 50, room
        assert broker.reconnects == 0 and resyncs == []


# -- 2. a failover of the shard of the node's keys is noticed -----------------------------------------

def place(cluster: RedisClusterProcs, prefix: str) -> tuple[str, str]:
    """A node id and a room such that the node's subscriber needs a link to the shard of the node's keys
    for its own channel and nothing else.

    `all`, the room (and the user of the same name) live on other shards; so does the node channel's name
    from before it carried the node's hash tag (`<prefix>node:<id>`): a node with that channel holds no
    link to the shard of its keys at all.
    """
    owned = shards(cluster)
    keys = Keys(prefix)
    for n in range(1000):
        node = f"k{n}"
        home = shard_of(owned, node)
        if home in (shard_of(owned, keys.all), shard_of(owned, f"{prefix}node:{node}")):
            continue
        room = next(name for name in (f"away-{i}" for i in range(1000)) if shard_of(owned, name) is not home)
        return node, room
    raise AssertionError("no node id fits the layout")


def node_index(proc: RedisProcess, keys: Keys, node: str) -> dict[str, Any]:
    """The node's own index keys on `proc` (its rooms and conns sets, its users hash), as plain values."""
    with proc.client() as r:
        return {"rooms": r.smembers(keys.node_rooms(node)), "conns": r.smembers(keys.node_conns(node)),
                "users": r.hgetall(keys.node_users(node))}


async def room_members(session: aiohttp.ClientSession, url: str, room: str) -> list[str] | None:
    async with session.get(f"{url}/api/rooms/{room}") as resp:
        if resp.status != 200:
            return None
        return sorted(m["conn_id"] for m in (await resp.json())["members"])


async def test_a_failover_of_the_shard_of_the_nodes_keys_rewrites_what_it_lost(
        own_redis_cluster: RedisClusterProcs, prefix: str, session: aiohttp.ClientSession) -> None:
    """SIGKILL of the primary owning `{<node id>}` (its client's room is on another shard): the node's own
    channel lives there, so its subscriber notices, reconnects and re-registers, and the node's index keys
    that the promoted replica lacks (a lost write) are back with the right content; /api/rooms stays exact."""
    cluster = own_redis_cluster
    keys = Keys(prefix)
    node_id, room = place(cluster, prefix)
    slot = key_slot(node_id.encode())
    home = cluster.primary_of_slot(slot)
    replica = cluster.replicas_of(home)[0]
    node = NodeProcess("--redis-url", cluster.url, "--key-prefix", prefix, "--node-id", node_id, "--heartbeat",
                       str(HB), "--unsubscribe-grace", "0.2", "--rate", "0", "--redis-timeout", "1")
    node.start()
    try:
        async def ready() -> bool:
            async with session.get(f"{node.url}/readyz") as resp:
                return resp.status == 200

        await wait_until(ready, timeout=10, what="the node to be ready")
        client = await Client.open(session, f"{node.ws_url}?user_id={room}")
        await client.join(room)
        want = {"rooms": {room}, "conns": {client.conn_id}}
        await wait_until(lambda: {k: v for k, v in node_index(home, keys, node_id).items() if k != "users"} == want,
                         what="the node's index to list its client")
        written = node_index(home, keys, node_id)
        assert list(written["users"]) == [room], written
        assert await room_members(session, node.url, room) == [client.conn_id]

        # lost writes: the promoted replica lacks the node's index. Deleted on the primary and replicated
        # before the kill, not on the promoted replica after it: the node may reconcile as soon as the slot
        # has its new owner, and a delete after that would race the very repair under test.
        with home.client() as r:
            r.delete(keys.node_rooms(node_id), keys.node_conns(node_id), keys.node_users(node_id))
            assert r.execute_command("WAIT", 1, 5000) == 1
            beat = int(r.hget(keys.node(node_id), "heartbeat_at") or 0)
            # heartbeats alone do not notice: it takes the failover to rewrite the index
            await wait_until(lambda: int(r.hget(keys.node(node_id), "heartbeat_at") or 0) > beat + 2 * HB * 1000,
                             what="two more heartbeats")
        assert node_index(home, keys, node_id) == {"rooms": set(), "conns": set(), "users": {}}

        killed = cluster.kill_primary_of_slot(slot)
        assert killed is home
        promoted = await asyncio.to_thread(cluster.wait_failover, slot)
        assert promoted is replica
        await wait_until(lambda: node_index(promoted, keys, node_id) == written, timeout=10,
                         what="the node to rewrite its index on the promoted replica")
        assert await room_members(session, node.url, room) == [client.conn_id]
        await client.close()
    finally:
        node.stop()


# -- 3. a link that fails while opening fails its own subscribe only -----------------------------------

class SilentServer:
    """A TCP server that accepts connections and never answers: a Redis that hangs in the handshake."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self.closed = 0  # connections the other side closed
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        self.closed += 1
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.parametrize("how", ["timeout", "cancelled"])
async def test_a_link_that_fails_while_opening_fails_only_its_own_subscribe(
        redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A channel routed to a shard that accepts the connection and never answers CLIENT SETNAME: its
    subscribe fails (a timeout, or the caller gives up), and the live links stay as they were: the broker
    stays connected, with no reconnect and no resync, and keeps delivering."""
    config = Config(redis_url=redis_server.url, node_id="opening", key_prefix=prefix, heartbeat=HB,
                    redis_timeout=0.5)
    keys = Keys(prefix)
    silent = SilentServer()
    await silent.start()
    got = Recorder()
    resyncs: list[float] = []
    try:
        async with running(broker_for(config), got, resyncs) as broker:
            live = broker._lost
            assert live is not None
            stranded, fine = keys.room_channel("stranded"), keys.room_channel("fine")
            route = broker._route
            monkeypatch.setattr(broker, "_route", lambda ch: silent.address if ch == stranded else route(ch))
            if how == "timeout":
                with pytest.raises(BrokerUnavailable):
                    await broker.subscribe([stranded])
            else:
                asking = asyncio.create_task(broker.subscribe([stranded]))
                await wait_until(lambda: silent.accepted == 1, what="the new link to reach the silent shard")
                asking.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asking
            # the broker closed the half-open connection (after its connection_lost callback ran)
            await wait_until(lambda: silent.closed == 1, what="the failed link to be closed")
            assert not live.done(), f"the live links were marked lost: {live.result()}"
            assert broker.connected and broker.reconnects == 0 and resyncs == []
            await broker.subscribe([fine])
            assert await broker.publish(fine, b"still here") == 1
            await wait_until(lambda: got.got == [(fine, b"still here")], what="a delivery on the live link")
            assert broker._lost is live and broker.reconnects == 0 and resyncs == []
    finally:
        await silent.close()
