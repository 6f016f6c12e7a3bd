"""The `hubnode` console script: check the flags, then run one node until SIGTERM/SIGINT and drain.

The node's own dependencies come with the `server` extra; a worker that
installed plain `hubnode` for the publisher gets one line saying so instead
of an ImportError traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from hubnode.config import ConfigError, parse_args

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
    except ConfigError as exc:
        print(f"hubnode: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


if __name__ == "__main__":
    raise SystemExit(main())
