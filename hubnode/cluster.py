"""Building a cluster-mode Node: Redis broker and Redis membership on one Redis."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from hubnode import __version__
from hubnode.broker.redis import RedisBroker
from hubnode.config import Config
from hubnode.membership.redis import RedisMembershipStore
from hubnode.node import Node
from publisher.keys import Keys

__all__ = ["redis_client", "redis_node"]


def redis_client(config: Config, retry: bool = True) -> aioredis.Redis:
    """A bounded pool: a connection storm queues for connections instead of opening thousands.

    With `retry`, a command that meets a broken connection (a pooled socket
    from before a Redis restart) is sent once more: right for the membership
    scripts, which are idempotent. The broker's client has no retry at all: a
    PUBLISH whose connection broke may have gone through, and resending it
    could deliver twice (PROTOCOL.md section 5 promises at most once).
    """
    assert config.redis_url is not None
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=32, timeout=config.redis_timeout,
        socket_timeout=config.redis_timeout, socket_connect_timeout=config.redis_timeout,
        retry=Retry(NoBackoff(), 1 if retry else 0, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False)
    return aioredis.Redis(connection_pool=pool)


def redis_node(config: Config) -> Node:
    assert config.redis_url is not None
    keys = Keys(config.key_prefix)
    broker = RedisBroker(config.redis_url, redis_client(config, retry=False), keys, config.node_id,
                         timeout=config.redis_timeout, probe_interval=config.heartbeat)
    store = RedisMembershipStore(redis_client(config), keys, config.node_id, heartbeat=config.heartbeat,
                                 address=f"{config.host}:{config.port}", version=__version__)
    return Node(config, broker=broker, store=store)
