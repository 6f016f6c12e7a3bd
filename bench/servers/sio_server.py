"""The python-socketio peer: AsyncServer on aiohttp with AsyncRedisManager.

The idiomatic Socket.IO set-up for several nodes: every node reads the one
Redis channel of the manager. A client joins a room with the `join` event
(acked with "ok"); on connect it enters the room `user:<id>` for its
`?user_id=`, Socket.IO's usual way of addressing a user. Engine.IO pings are
set far apart, as hubnode runs with `--ping-interval 0`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from urllib.parse import parse_qs

import socketio
from aiohttp import web


def build(redis_url: str) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(client_manager=manager, async_mode="aiohttp",
                               ping_interval=3600, ping_timeout=3600,
                               cors_allowed_origins="*", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, str], auth: object = None) -> None:
        users = parse_qs(environ.get("QUERY_STRING", "")).get("user_id")
        if users:
            await sio.enter_room(sid, f"user:{users[0]}")

    @sio.on("join")
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "ok"

    app = web.Application()
    sio.attach(app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(build(args.redis_url), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
