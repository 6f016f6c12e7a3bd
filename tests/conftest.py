"""Fixtures shared by every layer of the suite."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from hubnode.app import create_app
from hubnode.config import Config
from tests.helpers import RedisServer


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
