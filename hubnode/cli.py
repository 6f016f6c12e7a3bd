"""The `hubnode` console script: check the flags, then run one node until SIGTERM/SIGINT and drain.

The node's own dependencies come with the `server` extra; a worker that
installed plain `hubnode` for the publisher gets one line saying so instead
of an ImportError traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from hubnode.config import Config, ConfigError, parse_args
from hubnode.validate import shown
from publisher.topology import TopologyError

__all__ = ["main"]

SERVER_EXTRA = "pip install 'hubnode[server]'"


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)  # exits 2 with one line on a bad value
    try:
        from hubnode.auth import JwtVerifier
        from hubnode.logs import setup_logging
        from hubnode.serve import serve
    except ModuleNotFoundError as exc:
        print(f"hubnode: error: the node needs the server extra ({exc.name} is not installed): {SERVER_EXTRA}",
              file=sys.stderr)
        return 2
    try:
        config.check_exposure()
        if config.auth == "jwt":
            JwtVerifier(config)  # reads --jwt-public-key now: a bad file is a usage error, not a failed start
        check_files(config)
        if config.redis_url is not None:
            check_redis(config)
    except ConfigError as exc:
        print(f"hubnode: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


def check_files(config: Config) -> None:
    """Redis TLS files are read on every connection attempt: one that cannot be read would keep the
    node waiting for Redis forever, never ready. Say so now, as for --jwt-public-key."""
    for flag, path in (("--redis-ca", config.redis_ca), ("--redis-cert", config.redis_cert),
                       ("--redis-key", config.redis_key)):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None


def check_redis(config: Config) -> None:
    """Refuse a Redis topology that is wrong rather than down, before anything starts (docs/redis.md).

    A single Redis that is down is waited for (the node serves, not ready);
    seeds of a cluster or Sentinels of which none answers, a wrong master
    name, a failed TLS handshake or uncovered slots are configuration
    mistakes: one line, exit 2.
    """
    from hubnode.cluster import resolve

    try:
        resolve(config, strict=True)
    except TopologyError as exc:
        raise ConfigError(f"--redis-url {shown('redis_url', config.redis_url)}: {exc}") from None


if __name__ == "__main__":
    raise SystemExit(main())
