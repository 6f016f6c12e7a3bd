"""Serving one node: bind, log where, wait for a signal, drain.

Kept apart from hubnode.cli so that the `hubnode` command can parse and check
its flags, and explain a missing `server` extra, before aiohttp is imported.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from hubnode.app import NODE, create_app
from hubnode.config import Config
from publisher.core import redact_url as redact

__all__ = ["serve"]

log = logging.getLogger("hubnode")


def raise_open_files() -> None:
    """Take the whole hard open-files limit: every connection is a file (see --max-connections)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError) as exc:  # not POSIX, or not allowed
        log.warning("could not raise the open-files limit: %s", exc)


async def serve(config: Config) -> int:
    """Serve until a signal; returns the exit code."""
    raise_open_files()
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=1.0)
    try:
        await runner.setup()
    except Exception as exc:
        log.error("could not start: %s", exc)
        return 1
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("could not listen on %s:%d: %s", config.host, config.port, exc)
        await runner.cleanup()
        return 1
    mode = f"redis {redact(config.redis_url)}" if config.redis_url else "embedded broker (single node)"
    log.info("hubnode %s listening on %s (ws path /ws, %s)", config.node_id, _bound(runner), mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await app[NODE].drain()
    await runner.cleanup()
    return 0


def _bound(runner: web.AppRunner) -> str:
    """The address the socket really has (`--port 0` picks one), as a URL."""
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
