# mypy: disable-error-code="no-untyped-call"
# (redis-py's Sentinel and its cluster client's pubsub() and get_nodes() carry no annotations)
"""The Redis topologies of deploy/redis_servers.py do what their fixtures promise, with real redis-server.

A Redis Cluster of 3 primaries and 3 replicas, a Sentinel-managed primary
with a replica, and a TLS-only server: the fixtures the Redis Cluster,
Sentinel and TLS tests of hubnode stand on, and what `make cluster --redis
cluster|sentinel` runs. Each claim is checked against what the servers
themselves report (CLUSTER NODES, ROLE, INFO), and through redis-py's own
cluster and sentinel clients, never against a copy kept by the helpers.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import MovedError
from redis.retry import Retry
from redis.sentinel import Sentinel

from deploy.cluster import REDIS_FAILOVER_WAIT, Cluster, _redis_lines
from deploy.redis_servers import (
    HOST,
    SLOTS,
    RedisClusterProcs,
    RedisProcess,
    SentinelProcs,
    TlsFiles,
    find_executable,
    key_slot,
    wait_for,
)
from tests.helpers import SCALE, missing


@contextlib.contextmanager
def cluster_client(cluster: RedisClusterProcs) -> Iterator[RedisCluster]:
    """redis-py's cluster client, discovering the cluster from one plain node URL as an application would."""
    client = RedisCluster.from_url(cluster.seed_url, decode_responses=True)
    try:
        yield client
    finally:
        for node in client.get_nodes():  # close() leaves the nodes' pooled connections to the GC (redis-py 8.1)
            node.redis_connection.connection_pool.disconnect()
        client.close()


def moved(proc: RedisProcess, key: str) -> tuple[int, int] | None:
    """The slot and port of the MOVED redirection `proc` answers for GET `key`; None if it serves the key."""
    try:
        proc.call("GET", key)
    except MovedError as exc:
        return exc.slot_id, exc.port
    return None


def key_on_each_primary(cluster: RedisClusterProcs, prefix: str) -> dict[str, str]:
    """Primary name -> a key (starting with `prefix`) whose slot that primary serves."""
    owners = {slot: proc.name for proc in cluster.primaries() if (me := cluster.myself(proc)) for slot in me.slots}
    keys: dict[str, str] = {}
    for i in range(1000):
        keys.setdefault(owners[key_slot(f"{prefix}{i}".encode())], f"{prefix}{i}")
    return keys


# -- Redis Cluster ---------------------------------------------------------------------------

def test_cluster_has_every_slot_on_three_primaries_each_with_a_connected_replica(
        redis_cluster: RedisClusterProcs) -> None:
    """16384 slots, split over 3 primaries without overlap; each primary has one replica whose link is up."""
    primaries = redis_cluster.primaries()
    assert len(primaries) == 3
    slots = [me.slots for p in primaries if (me := redis_cluster.myself(p))]
    assert sum(map(len, slots)) == SLOTS and set().union(*slots) == set(range(SLOTS))
    for primary in primaries:
        [replica] = redis_cluster.replicas_of(primary)
        assert replica not in primaries
        info = replica.info("replication")
        assert (info["role"], info["master_port"], info["master_link_status"]) == ("slave", primary.port, "up")
    for proc in redis_cluster.procs:
        info = proc.call("CLUSTER", "INFO")
        for line in ("cluster_state:ok", f"cluster_slots_assigned:{SLOTS}", "cluster_known_nodes:6",
                     "cluster_size:3"):
            assert line in info, (proc.name, info)
    assert redis_cluster.url == "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in redis_cluster.ports[:3])


def test_redis_py_cluster_client_writes_and_reads_on_all_three_shards(redis_cluster: RedisClusterProcs,
                                                                      prefix: str) -> None:
    """Keys set through RedisCluster land on the primary of their slot, which serves them without MOVED."""
    keys = key_on_each_primary(redis_cluster, prefix)
    assert len(keys) == 3
    with cluster_client(redis_cluster) as client:
        for name, key in keys.items():
            assert client.set(key, name)
        assert [client.get(key) for key in keys.values()] == list(keys)
    by_name = {p.name: p for p in redis_cluster.procs}
    for name, key in keys.items():
        assert by_name[name].call("GET", key) == name
        others = [p for p in redis_cluster.primaries() if p.name != name]
        assert all(moved(p, key) == (key_slot(key.encode()), by_name[name].port) for p in others)
    with cluster_client(redis_cluster) as client:
        assert client.delete(*keys.values()) == 3


def test_shard_channel_message_is_seen_by_one_shard_only(redis_cluster: RedisClusterProcs, prefix: str) -> None:
    """SPUBLISH counts on the channel's primary and reaches its replica only; PUBLISH reaches all six nodes."""
    channel = f"{prefix}room"
    owner = redis_cluster.primary_of_slot(key_slot(channel.encode()))
    shard = {owner.name, *(r.name for r in redis_cluster.replicas_of(owner))}
    with cluster_client(redis_cluster) as client:
        pubsub = client.pubsub()
        try:
            pubsub.ssubscribe(channel)
            assert pubsub.get_sharded_message(timeout=5 * SCALE)["type"] == "ssubscribe"
            before = redis_cluster.shard_pubsub_counts()
            assert client.spublish(channel, "hello") == 1
            message = pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=5 * SCALE)
            assert message is not None and message["data"] == "hello"

            def replicated() -> bool:
                return all(redis_cluster.shard_pubsub_counts()[n].bus_publishshard > before[n].bus_publishshard
                           for n in shard - {owner.name})

            wait_for(replicated, 5 * SCALE, "the shard's replica to get the message over the bus")
            after = redis_cluster.shard_pubsub_counts()
        finally:
            pubsub.close()
        assert after[owner.name].spublish == before[owner.name].spublish + 1
        assert before[owner.name].shard_channels >= 1
        for name in set(after) - shard:
            assert (after[name].spublish, after[name].bus_publishshard) == (
                before[name].spublish, before[name].bus_publishshard), name
        assert client.publish(channel, "to everyone") == 0  # the contrast: a plain channel goes everywhere
    wait_for(lambda: all(c.bus_publish > before[n].bus_publish for n, c in redis_cluster.shard_pubsub_counts().items()
                         if c.publish == before[n].publish), 5 * SCALE, "the plain PUBLISH to reach the other nodes")


def test_killed_primary_is_replaced_by_its_replica(own_redis_cluster: RedisClusterProcs) -> None:
    """SIGKILL of a slot's primary: its replica serves the slot, with the data, and the cluster is ok again."""
    cluster, key = own_redis_cluster, "failover-key"
    slot = key_slot(key.encode())
    primary = cluster.primary_of_slot(slot)
    [replica] = cluster.replicas_of(primary)
    primary.call("SET", key, "kept")
    assert primary.call("WAIT", 1, int(5000 * SCALE)) == 1
    started = time.monotonic()
    assert cluster.kill_primary_of_slot(slot) is primary and not primary.alive()
    assert cluster.wait_failover(slot, timeout=20 * SCALE) is replica
    took = time.monotonic() - started
    me = cluster.myself(replica)
    assert me is not None and me.primary and slot in me.slots
    assert replica.call("GET", key) == "kept"
    assert all(cluster.state_ok(p) for p in cluster.answering())
    assert len(cluster.answering()) == 5
    print(f"failover took {took:.1f} s")


def test_migrate_slot_moves_the_slot_and_its_keys(own_redis_cluster: RedisClusterProcs) -> None:
    """After migrate_slot the target serves the slot and its keys; the source answers MOVED; all agree."""
    cluster, key = own_redis_cluster, "{moving}key"
    slot = key_slot(key.encode())
    source = cluster.primary_of_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    for i in range(150):  # more than one GETKEYSINSLOT batch
        source.call("SET", f"{{moving}}{i}", str(i))
    source.call("SET", key, "moved")
    cluster.migrate_slot(slot, target)
    assert cluster.primary_of_slot(slot) is target
    assert source.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert target.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 151
    assert target.call("GET", key) == "moved"
    assert moved(source, key) == (slot, target.port)
    target_id = cluster.myself(target)
    assert target_id is not None

    def owners(proc: RedisProcess) -> set[str]:
        return {n.node_id for n in cluster.view(proc) or [] if slot in n.slots}

    assert all(owners(proc) == {target_id.node_id} for proc in cluster.primaries())  # told by migrate_slot
    wait_for(lambda: all(owners(proc) == {target_id.node_id} for proc in cluster.procs), 10 * SCALE,
             "the replicas to learn the new owner by gossip")
    with cluster_client(cluster) as client:
        assert client.get(key) == "moved"


def test_uncovered_slot_fails_the_cluster_until_covered_again(own_redis_cluster: RedisClusterProcs) -> None:
    """A slot nobody serves: every node says cluster_state:fail and refuses keys; covered again, all is ok."""
    cluster, key = own_redis_cluster, "uncovered"
    slot = key_slot(key.encode())
    owner = cluster.uncover_slot(slot)
    wait_for(lambda: not any(cluster.state_ok(p) for p in cluster.procs), 10 * SCALE, "cluster_state:fail")
    with pytest.raises(redis.exceptions.ClusterDownError, match="Hash slot not served"):
        owner.call("GET", key)
    cluster.cover_slot(slot, owner)
    wait_for(cluster.formed, 20 * SCALE, "the cluster to be formed again")
    assert cluster.primary_of_slot(slot) is owner and owner.call("GET", key) is None


# -- Sentinel --------------------------------------------------------------------------------

def test_sentinels_promote_the_replica_when_the_primary_is_killed(redis_sentinel: SentinelProcs) -> None:
    """redis-py's Sentinel client finds the primary, then, after a SIGKILL, the promoted replica with the data."""
    setup = redis_sentinel
    old, replica = setup.primary, setup.replica
    assert setup.url == "redis+sentinel://" + ",".join(f"{HOST}:{p}" for p in setup.sentinel_ports) + "/hubmaster"
    sentinel = Sentinel([(HOST, port) for port in setup.sentinel_ports], socket_timeout=2)
    try:
        assert sentinel.discover_master("hubmaster") == (HOST, old.port)
        assert sentinel.discover_slaves("hubmaster") == [(HOST, replica.port)]
        with sentinel.master_for("hubmaster", decode_responses=True) as client:
            client.set("sentinel-key", "kept")
        assert old.call("WAIT", 1, int(5000 * SCALE)) == 1
        assert setup.kill_primary() is old and not old.alive()
        assert setup.wait_failover(timeout=20 * SCALE) is replica
        assert (setup.primary, setup.replica) == (replica, old)
        assert replica.call("ROLE")[0] == "master"
        assert sentinel.discover_master("hubmaster") == (HOST, replica.port)
        with sentinel.master_for("hubmaster", decode_responses=True) as client:
            assert client.get("sentinel-key") == "kept"
    finally:
        for client in sentinel.sentinels:
            client.close()


# -- TLS -------------------------------------------------------------------------------------

def test_tls_server_accepts_a_client_trusting_its_ca(redis_tls: RedisProcess, tls_files: TlsFiles) -> None:
    """rediss:// with the CA works by IP and by the name localhost, with or without a client certificate."""
    assert redis_tls.url == f"rediss://{HOST}:{redis_tls.port}/0"
    for host, cert, key in (("127.0.0.1", None, None), ("localhost", None, None),
                            ("127.0.0.1", str(tls_files.client_cert), str(tls_files.client_key))):
        with redis.Redis(host=host, port=redis_tls.port, ssl=True, ssl_ca_certs=str(tls_files.ca_cert),
                         ssl_certfile=cert, ssl_keyfile=key, decode_responses=True) as client:
            assert client.set(f"tls-{host}", "secret") and client.get(f"tls-{host}") == "secret"


def test_tls_server_is_refused_by_a_client_trusting_another_ca(redis_tls: RedisProcess,
                                                               tls_files: TlsFiles) -> None:
    """A client that trusts the unrelated CA fails verification; a plaintext client gets no answer."""
    once = Retry(NoBackoff(), 0)  # redis-py would otherwise retry 3 times with backoff
    with redis.Redis(host=HOST, port=redis_tls.port, ssl=True, ssl_ca_certs=str(tls_files.wrong_ca_cert),
                     retry=once) as client, pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        client.ping()
    with redis.Redis(host=HOST, port=redis_tls.port, socket_timeout=2 * SCALE, retry=once) as plain, \
            pytest.raises(redis.ConnectionError):
        plain.ping()


# -- make cluster --redis cluster|sentinel ------------------------------------------------------

@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
def test_make_cluster_runs_the_topology_as_supervised_children(mode: str, tmp_path: Path) -> None:
    """deploy.cluster starts the topology under its supervisor and gives the nodes its URL; a killed
    primary is reported and restarted only after its replica had time to take over."""
    for name in ("redis-server", "redis-cli"):
        try:
            find_executable(name)
        except RuntimeError as exc:
            missing(str(exc))
    cluster = Cluster(port=0, nodes=1, redis_port=0, redis=mode, workdir=tmp_path / "c")
    cluster.dir.mkdir()
    try:
        cluster.start_redis(time.monotonic() + 30 * SCALE)
        assert cluster.redis_url.startswith(f"redis+{mode}://")
        assert cluster.redis_url == cluster.redis.url
        lines = _redis_lines(cluster)
        assert len(lines) == (7 if mode == "cluster" else 6), lines
        assert lines[-1].split() == ["redis", cluster.redis_url]
        pids = {proc.name: cluster.procs[proc.name].pid for proc in cluster.redis.procs}
        assert all(f"pid {pids[line.split()[0]]}" in line for line in lines[:-1])
        first = cluster.redis.procs[0]
        assert cluster.redis.roles()[first.name] == "primary"
        cluster.procs[first.name].signal(signal.SIGKILL)
        cluster.procs[first.name].popen.wait(10)
        [event] = cluster.check()
        assert event.kind == "exited" and f"restarting it in {REDIS_FAILOVER_WAIT[mode]:g} s" in event.text, event
    finally:
        cluster.stop()
    assert not any(p.alive() for p in cluster.procs.values())
