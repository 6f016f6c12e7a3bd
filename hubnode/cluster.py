"""The Redis parts of a cluster-mode node: broker and membership store on one Redis, a Sentinel-managed
primary or a Redis Cluster (docs/redis.md).

`Node(config)` calls `redis_parts` itself whenever `config.redis_url` is set,
so a node configured for Redis always runs on Redis, whether it was built by
the CLI, `create_app` or directly from Python.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hubnode import __version__
from hubnode.broker.redis import RedisBroker
from hubnode.config import Config
from hubnode.membership.redis import RedisMembershipStore
from publisher.core import redact_url
from publisher.keys import Keys
from publisher.redis_clients import async_client, probe
from publisher.topology import Target, TopologyError

if TYPE_CHECKING:
    from hubnode.node import Node

__all__ = ["redis_client", "redis_node", "redis_parts", "resolve"]

log = logging.getLogger(__name__)


_resolved: dict[tuple[str, str | None, str | None, str | None], Target] = {}


def resolve(config: Config, strict: bool = False) -> Target:
    """The Target of `config.redis_url`, with a `redis://` seed's kind asked of Redis (one INFO).

    Asked once per process: the command line asks first (`strict`, to refuse
    a wrong topology with one line before anything starts), and the node it
    then builds takes that answer rather than asking again.

    A single Redis that cannot be reached now is taken for one Redis (the
    node then serves, not ready, until it is back, as it always has);
    anything wrong rather than down (a TLS failure, a Sentinel reached by a
    plain URL, a cluster with uncovered slots) raises TopologyError, and
    with `strict` so do cluster seeds or Sentinels of which none answers.
    """
    assert config.redis_url is not None
    key = (config.redis_url, config.redis_ca, config.redis_cert, config.redis_key)
    found = _resolved.get(key)
    if found is not None:
        return found
    target = config.redis_target()
    try:
        found = probe(target, min(config.redis_timeout, 2.0))
    except (ConnectionError, TimeoutError) as exc:
        if strict and target.kind != "single":
            raise TopologyError(str(exc)) from None
        log.warning("could not ask Redis at %s what it is (%s): taking it for %s",
                    redact_url(target.url), exc, "one Redis" if target.kind == "single" else f"a {target.kind}")
        return target  # not remembered: the node that is built next asks again
    _resolved[key] = found
    return found


def redis_client(config: Config, target: Target, retry: bool = True, role: str = "cmd") -> Any:
    """A bounded pool: a connection storm queues for connections instead of opening thousands.

    With `retry`, a command that meets a broken connection (a pooled socket
    from before a Redis restart) is sent once more: right for the membership
    scripts, which are idempotent. The broker's client has no retry at all: a
    PUBLISH whose connection broke may have gone through, and resending it
    could deliver twice (docs/protocol.md promises at most once per id).
    Each connection is named after the node in CLIENT LIST.
    """
    return async_client(target, timeout=config.redis_timeout, max_connections=32,
                        name=f"hubnode:{config.node_id}:{role}", retries=1 if retry else 0)


def redis_parts(config: Config, target: Target | None = None) -> tuple[RedisBroker, RedisMembershipStore]:
    """The broker and the store a node with `config.redis_url` runs on (`target`: already resolved)."""
    assert config.redis_url is not None
    target = target or resolve(config)
    keys = Keys(config.key_prefix)
    broker = RedisBroker(target, redis_client(config, target, retry=False, role="pub"), keys, config.node_id,
                         timeout=config.redis_timeout, probe_interval=config.heartbeat,
                         max_payload_bytes=config.max_envelope_bytes, name=f"hubnode:{config.node_id}:sub")
    store = RedisMembershipStore(redis_client(config, target), keys, config.node_id, heartbeat=config.heartbeat,
                                 address=f"{config.host}:{config.port}", version=__version__,
                                 timeout=config.redis_timeout, announces=config.announces, sharded=target.sharded)
    return broker, store


def redis_node(config: Config) -> Node:
    """A cluster-mode Node: the same as `Node(config)` with a Redis URL."""
    from hubnode.node import Node

    return Node(config)
