"""The redis-py clients for a `Target`, and the one question asked of the servers before using them.

- `probe` asks, once, what the servers are: a `redis://` seed that says
  `cluster_enabled:1` is a Redis Cluster, a Sentinel reached by a plain URL is
  a mistake worth one clear line, and a cluster with uncovered slots or a
  Sentinel that knows no such primary is refused before traffic starts;
- `async_client` / `sync_client` build the client for a resolved kind
  (`Redis`, `RedisCluster`, or a Sentinel-managed `Redis` that follows
  failovers), with TLS on every connection when the URL says `rediss`;
- `discover_primary` names the Sentinels' current primary, for the node's
  own subscriber connection (hubnode.broker).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry as SyncRetry
from redis.sentinel import MasterNotFoundError, Sentinel

from publisher.topology import Address, Target, TopologyError

__all__ = ["async_client", "discover_primary", "probe", "sync_client"]

_ONCE = SyncRetry(NoBackoff(), 0)
"""The probe asks once: redis-py's default retries would multiply its timeout by four."""
_ONCE_ASYNC = AsyncRetry(NoBackoff(), 0)


# -- asking the servers ------------------------------------------------------------

def probe(target: Target, timeout: float) -> Target:
    """Ask the servers what they are, once; the Target with its kind resolved.

    Raises TopologyError (one line) for a topology that is wrong rather than
    down: a TLS handshake that fails, a Sentinel that knows no such primary,
    a cluster with uncovered slots, a plain URL that reaches a Sentinel.
    Raises ConnectionError when nothing answers at all, TimeoutError when
    what answers the connection says nothing within `timeout` (the caller
    decides whether to wait for it).
    """
    if target.kind == "sentinel":
        return _probe_sentinel(target, timeout)
    if target.unix_path:
        _info(redis.Redis(unix_socket_path=target.unix_path, db=target.db, socket_timeout=timeout, retry=_ONCE,
                          socket_connect_timeout=timeout, **target.connection_kwargs()), target, "server")
        return target
    try:
        return _probe_servers(target, timeout)
    except _NoInfo:  # a least-privilege ACL user: trust the URL
        return target


class _NoInfo(Exception):
    """INFO is not allowed for this user (NOPERM): the URL's word is all there is."""


def _probe_servers(target: Target, timeout: float) -> Target:
    errors: list[str] = []
    silent = 0  # seeds that took the connection and never answered
    for host, port in target.hosts:
        client = redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout, retry=_ONCE,
                             **target.connection_kwargs())
        try:
            info = _info(client, target, "server", "cluster")
        except (ConnectionError, TimeoutError) as exc:
            errors.append(f"{host}:{port}: {exc}")
            silent += isinstance(exc, TimeoutError)
            continue
        if info.get("redis_mode") == "sentinel":
            raise TopologyError(f"{host}:{port} is a Redis Sentinel: use redis+sentinel://{host}:{port}/"
                                "<master name>")
        enabled = str(info.get("cluster_enabled", "0")) == "1"
        if target.kind == "cluster" and not enabled:
            raise TopologyError(f"{host}:{port} is not in cluster mode: use redis://{host}:{port} for one Redis")
        if not enabled:
            return target
        _check_coverage(client, host, port)
        return target.with_kind("cluster")
    if silent == len(target.hosts):
        raise TimeoutError(f"no Redis answered within {timeout:g}s at " + "; ".join(errors))
    raise ConnectionError("no Redis answered at " + "; ".join(errors))


def _info(client: redis.Redis, target: Target, *sections: str) -> dict[str, Any]:
    try:
        with client:
            found: dict[str, Any] = {}
            for section in sections:
                found.update(client.info(section))
            return found
    except redis.AuthenticationError as exc:
        raise TopologyError(f"Redis refused the credentials: {exc}") from None
    except redis.ResponseError as exc:
        if "NOPERM" in str(exc):
            raise _NoInfo() from None
        if "NOAUTH" in str(exc):
            raise TopologyError(f"Redis refused the connection: {exc}") from None
        raise TopologyError(f"Redis answered INFO with an error: {exc}") from None
    except redis.TimeoutError as exc:
        raise TimeoutError(str(exc) or "timed out") from None
    except (redis.ConnectionError, OSError) as exc:
        tls = _tls_failure(exc)
        if tls:
            raise TopologyError(f"TLS handshake with Redis failed: {tls}") from None
        raise ConnectionError(str(exc) or type(exc).__name__) from None


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS reason inside a connection error (a wrong CA, a missing client certificate), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return getattr(current, "verify_message", None) or current.reason or str(current)
        current = current.__cause__ or current.__context__
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "SSL", "certificate"):
        if marker in text:
            return text
    return None


def _check_coverage(client: redis.Redis, host: str, port: int) -> None:
    try:
        with client:
            info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError) as exc:
        raise ConnectionError(str(exc)) from None
    text = info.decode() if isinstance(info, bytes) else str(info)
    fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
    assigned = int(fields.get("cluster_slots_assigned", "0"))
    state = fields.get("cluster_state", "?")
    if assigned < 16384:
        raise TopologyError(f"the Redis Cluster at {host}:{port} is not usable: {assigned} of 16384 slots "
                            f"are assigned and cluster_state is {state}")
    if state != "ok":  # every slot has an owner, one is down: a failover in progress, worth waiting for
        raise ConnectionError(f"the Redis Cluster at {host}:{port} reports cluster_state {state}")


def _sentinel_kwargs(target: Target, timeout: float, aio: bool = False) -> dict[str, Any]:
    """Sentinels take the URL's TLS settings; their own password, if any, comes from ?sentinel_password=.

    Each Sentinel is asked once (no retries), for a share of the caller's
    timeout: one whose host is down and drops packets must not use up the
    whole deadline before the next one is asked.
    """
    each = max(0.2, timeout / (2 * len(target.hosts)))  # every Sentinel can be asked within `timeout`
    kwargs: dict[str, Any] = {"socket_timeout": each, "socket_connect_timeout": each,
                              "retry": _ONCE_ASYNC if aio else _ONCE}
    if target.tls:
        kwargs.update(ssl=True, ssl_ca_certs=target.ca, ssl_certfile=target.cert, ssl_keyfile=target.key)
    if "sentinel_password" in target.options:
        kwargs["password"] = target.options["sentinel_password"]
    return kwargs


def _probe_sentinel(target: Target, timeout: float) -> Target:
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, timeout),  # type: ignore[no-untyped-call]
                        socket_timeout=timeout)
    answered = known = False
    for host, port in target.hosts:
        client = redis.Redis(host=host, port=port, **_sentinel_kwargs(target, timeout))
        try:
            with client:
                info = client.info("server")
                if info.get("redis_mode") == "sentinel":
                    known = known or target.master in client.sentinel_masters()
            answered = True
            if info.get("redis_mode") != "sentinel":
                raise TopologyError(f"{host}:{port} is not a Redis Sentinel (redis_mode is "
                                    f"{info.get('redis_mode')!r}): use redis://{host}:{port}")
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            tls = _tls_failure(exc)
            if tls:
                raise TopologyError(f"TLS handshake with a Sentinel failed: {tls}") from None
    if not answered:
        raise ConnectionError("no Sentinel answered at " + ", ".join(f"{h}:{p}" for h, p in target.hosts))
    if not known:
        raise TopologyError(f"no Sentinel at {', '.join(f'{h}:{p}' for h, p in target.hosts)} knows a "
                            f"primary named {target.master!r}")
    try:
        sentinel.discover_master(target.master)  # type: ignore[no-untyped-call]
    except MasterNotFoundError:  # known by name, down now: a failover to wait for
        raise ConnectionError(f"the Sentinels know {target.master!r} but name no primary for it now") from None
    finally:
        for client in sentinel.sentinels:
            client.close()
    return target


# -- clients -------------------------------------------------------------------------

class _QueueingCluster(aioredis.RedisCluster):
    """An asyncio RedisCluster whose commands wait for a free connection instead of failing.

    redis-py's cluster client raises MaxConnectionsError once a shard's pool
    is busy; a node in a publish storm must queue, as it does on a single
    Redis (BlockingConnectionPool). At most `in_flight` commands run at once,
    so no shard's pool can run out.
    """

    def __init__(self, in_flight: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gate = asyncio.Semaphore(in_flight)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._gate:
            return await super().execute_command(*args, **kwargs)


def async_client(target: Target, *, timeout: float, max_connections: int, name: str = "",
                 retries: int = 0) -> Any:
    """A redis.asyncio client for a resolved Target: Redis, RedisCluster, or Sentinel-managed Redis.

    `retries` resends a command once its connection broke (only for callers
    whose commands are safe to repeat). Every command has `timeout`.
    """
    retry = AsyncRetry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,))
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              **({"client_name": name} if name else {})}
    if target.kind == "cluster":
        return _QueueingCluster(
            max_connections, startup_nodes=[AsyncClusterNode(h, p) for h, p in target.hosts],
            max_connections=max_connections, retry=retry, **common, **target.connection_kwargs())
    if target.kind == "sentinel":
        # not capped: redis-py's Sentinel pool has no blocking variant, and a cap would fail
        # commands in a storm rather than queue them (a single Redis's pool queues)
        sentinel = AsyncSentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, timeout, aio=True),  # type: ignore[no-untyped-call]
                                 **common, **target.connection_kwargs())
        return sentinel.master_for(target.master, db=target.db, retry=retry, **common)
    pool = aioredis.BlockingConnectionPool.from_url(
        target.single_url if not target.unix_path else target.url, max_connections=max_connections,
        timeout=timeout, retry=retry, retry_on_timeout=False, **common, **_tls_files(target))
    return aioredis.Redis.from_pool(pool)


def sync_client(target: Target, *, timeout: float, max_connections: int = 1, name: str = "",
                retries: int = 0) -> Any:
    """The blocking twin of `async_client` (for `Publisher` and hubctl)."""
    retry = SyncRetry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,))
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              **({"client_name": name} if name else {})}
    if target.kind == "cluster":
        return redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],  # type: ignore[no-untyped-call]
                                  retry=retry, **common, **target.connection_kwargs())
    if target.kind == "sentinel":
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, timeout),  # type: ignore[no-untyped-call]
                            **common, **target.connection_kwargs())
        return sentinel.master_for(target.master, db=target.db, retry=retry, **common)  # type: ignore[no-untyped-call]
    pool = redis.BlockingConnectionPool.from_url(
        target.single_url if not target.unix_path else target.url, max_connections=max_connections,
        timeout=timeout, retry=retry, **common, **_tls_files(target))
    return redis.Redis.from_pool(pool)


def _tls_files(target: Target) -> dict[str, Any]:
    """TLS files given as flags rather than in the URL (the URL's own ssl_* options go through from_url)."""
    if not target.tls:
        return {}
    given = {"ssl_ca_certs": target.ca, "ssl_certfile": target.cert, "ssl_keyfile": target.key}
    return {k: v for k, v in given.items() if v and k not in target.options}


async def discover_primary(target: Target, timeout: float) -> Address:
    """The address of the primary the Sentinels name now (for the node's subscriber connection)."""
    sentinel = AsyncSentinel(list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, timeout, aio=True))  # type: ignore[no-untyped-call]
    try:
        host, port = await sentinel.discover_master(target.master)
    except MasterNotFoundError as exc:
        raise ConnectionError(f"no Sentinel names a primary {target.master!r} now ({exc})") from None
    finally:
        for client in sentinel.sentinels:
            await client.aclose()
    return str(host), int(port)

