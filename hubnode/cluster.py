"""The Redis parts of a cluster-mode node: broker and membership store on one Redis.

`Node(config)` calls `redis_parts` itself whenever `config.redis_url` is set,
so a node configured for Redis always runs on Redis, whether it was built by
the CLI, `create_app` or directly from Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from hubnode import __version__
from hubnode.broker.redis import RedisBroker
from hubnode.config import Config
from hubnode.membership.redis import RedisMembershipStore
from publisher.keys import Keys

if TYPE_CHECKING:
    from hubnode.node import Node

__all__ = ["redis_client", "redis_node", "redis_parts"]


def redis_client(config: Config, retry: bool = True, role: str = "cmd") -> aioredis.Redis:
    """A bounded pool: a connection storm queues for connections instead of opening thousands.

    With `retry`, a command that meets a broken connection (a pooled socket
    from before a Redis restart) is sent once more: right for the membership
    scripts, which are idempotent. The broker's client has no retry at all: a
    PUBLISH whose connection broke may have gone through, and resending it
    could deliver twice (PROTOCOL.md section 5 promises at most once per id).
    The client owns its pool (`from_pool`), so `aclose()` closes the pooled
    sockets too, and each connection is named after the node in CLIENT LIST.
    """
    assert config.redis_url is not None
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=32, timeout=config.redis_timeout,
        socket_timeout=config.redis_timeout, socket_connect_timeout=config.redis_timeout,
        retry=Retry(NoBackoff(), 1 if retry else 0, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False, client_name=f"hubnode:{config.node_id}:{role}")
    return aioredis.Redis.from_pool(pool)


def redis_parts(config: Config) -> tuple[RedisBroker, RedisMembershipStore]:
    """The broker and the store a node with `config.redis_url` runs on."""
    assert config.redis_url is not None
    keys = Keys(config.key_prefix)
    broker = RedisBroker(config.redis_url, redis_client(config, retry=False, role="pub"), keys, config.node_id,
                         timeout=config.redis_timeout, probe_interval=config.heartbeat,
                         max_payload_bytes=config.max_envelope_bytes, name=f"hubnode:{config.node_id}:sub")
    store = RedisMembershipStore(redis_client(config), keys, config.node_id, heartbeat=config.heartbeat,
                                 address=f"{config.host}:{config.port}", version=__version__,
                                 timeout=config.redis_timeout)
    return broker, store


def redis_node(config: Config) -> Node:
    """A cluster-mode Node: the same as `Node(config)` with a Redis URL."""
    from hubnode.node import Node

    return Node(config)
