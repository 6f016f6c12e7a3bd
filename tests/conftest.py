"""Fixtures shared by every layer of the suite."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from deploy.redis_servers import (
    RedisClusterProcs,
    RedisProcess,
    RedisTopologyError,
    SentinelProcs,
    TlsFiles,
    find_executable,
    free_port,
)
from hubnode.app import create_app
from hubnode.config import Config
from tests.helpers import SCALE, RedisServer, missing

_T = TypeVar("_T", RedisProcess, RedisClusterProcs, SentinelProcs)


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Leaks are reported by the test that made them.

    An unclosed socket, file or client warns (PytestUnraisableExceptionWarning,
    an error here) only when it is garbage-collected: collecting after each
    test's own teardown pins the warning on that test, not on a later one.
    """
    yield
    gc.collect()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests isolate themselves by key prefix."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be restarted, reconfigured or have connections killed."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to this test, so tests sharing one Redis never collide."""
    return f"t{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}:"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def node_config(**overrides: object) -> Config:
    """A test node config: quick grace periods, no pings, a readable node id."""
    base: dict[str, object] = {"node_id": "n1", "unsubscribe_grace": 0.2, "ping_interval": 0}
    base.update(overrides)
    return Config(**base)  # type: ignore[arg-type]


async def start_server(config: Config) -> TestServer:
    server = TestServer(create_app(config), host="127.0.0.1", port=0)
    await server.start_server()
    return server


@pytest.fixture
async def hub() -> AsyncIterator[TestServer]:
    """A single in-process node (embedded broker) on a free port."""
    server = await start_server(node_config())
    yield server
    await server.close()


# -- Redis topologies (deploy/redis_servers.py): a Redis Cluster, Sentinel, TLS ------------------

def _needs(*names: str) -> None:
    """Skip (fail under HUB_TEST_REQUIRE_ALL=1) when one of the executables a topology runs is absent."""
    for name in names:
        try:
            find_executable(name)
        except RedisTopologyError as exc:
            missing(str(exc))


def _running(topology: _T) -> Iterator[_T]:
    """Start `topology` (deadline scaled by HUB_TEST_TIMEOUT_SCALE), yield it, stop every process it ran."""
    topology.start(timeout=30 * SCALE)
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    """One Redis Cluster (3 primaries, a replica each) for the session; tests isolate themselves by key
    prefix. A test that kills a node, moves or uncovers a slot takes `own_redis_cluster` instead."""
    _needs("redis-server", "redis-cli")
    yield from _running(RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")))


@pytest.fixture
def own_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    """A Redis Cluster of this test's own, free to lose a primary or have slots moved."""
    _needs("redis-server", "redis-cli")
    yield from _running(RedisClusterProcs(tmp_path_factory.mktemp("own-redis-cluster")))


@pytest.fixture
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelProcs]:
    """A primary, its replica and three sentinels (master name `hubmaster`), this test's own."""
    _needs("redis-server")
    yield from _running(SentinelProcs(tmp_path_factory.mktemp("redis-sentinel")))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA with a server (127.0.0.1, localhost) and a client certificate, and an unrelated CA."""
    _needs("openssl")
    return TlsFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def redis_tls(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server on TLS only (its url is rediss://...), trusting clients of tls_files' CA; a client
    certificate is accepted but not required."""
    _needs("redis-server")
    yield from _running(RedisProcess("redis-tls", free_port(), tmp_path_factory.mktemp("redis-tls"), tls=tls_files))
