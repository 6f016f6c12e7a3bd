"""Assembling a Node into an aiohttp application.

`create_app(config)` builds a complete hub (WebSocket endpoint, HTTP API,
static pages); `mount(app, node)` adds a hub to an application you already
have, at any route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from aiohttp import web

from hubnode.appkey import NODE
from hubnode.config import Config
from hubnode.http_api import add_routes
from hubnode.metrics import add_metrics
from hubnode.node import Node
from hubnode.ws import websocket_handler

__all__ = ["NODE", "build_node", "create_app", "mount"]


def build_node(config: Config) -> Node:
    """A Node with the broker and store the config asks for (Redis when redis_url is set)."""
    return Node(config)


def mount(app: web.Application, node: Node, path: str = "/ws") -> None:
    """Serve `node`'s WebSocket endpoint at `path` and tie its life to the app's.

    The node starts with the app and drains in `on_shutdown`: once upgraded, a
    socket is the node's (hubnode.connection), not aiohttp's, so aiohttp's own
    shutdown would not close it. The `101` is written by the node, so headers
    that middlewares or `on_response_prepare` add do not reach it.
    """
    app[NODE] = node
    app.router.add_get(path, websocket_handler, allow_head=False)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await node.start()
        yield
        await node.drain()  # no-op when on_shutdown already drained

    async def on_shutdown(_app: web.Application) -> None:
        await node.drain()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)


def create_app(config: Config | None = None, node: Node | None = None) -> web.Application:
    """A complete hub application: /ws, the HTTP API of docs/http-api.md, pages."""
    config = config or (node.config if node is not None else Config())
    app = web.Application(client_max_size=max(config.max_message_bytes, 1024 * 1024))
    node = node or build_node(config)
    mount(app, node)
    add_routes(app)
    add_metrics(app, node)
    _add_static(app)
    return app


def _add_static(app: web.Application) -> None:
    """The demo chat at /, the dashboard at /dashboard, and the hub.js client.

    Pages and scripts are plain files in hubnode/static, served as they are
    (no build step), with `no-cache` so browsers pick up a node upgrade at once.
    They are read once, here: a request never touches the disk, so a slow disk
    cannot block the event loop that serves every socket.
    """
    static = resources.files("hubnode") / "static"
    routes = {  # path -> (file, content type)
        "/": ("index.html", "text/html"),
        "/dashboard": ("dashboard.html", "text/html"),
        "/hub.js": ("hub.js", "application/javascript"),
        "/hub.mjs": ("hub.mjs", "application/javascript"),
        "/demo.js": ("demo.js", "application/javascript"),
        "/dashboard.js": ("dashboard.js", "application/javascript"),
        "/hub.css": ("hub.css", "text/css"),
    }

    def file_route(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = (static / name).read_bytes()

        async def serve(_request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})
        return serve

    for path, (name, content_type) in routes.items():
        app.router.add_get(path, file_route(name, content_type))
