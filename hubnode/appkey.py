"""The key under which an aiohttp application holds its Node.

A module of its own so that the edges (ws, http_api, metrics) can find the
node without importing `hubnode.app`, which imports them: no import cycle,
no function-level imports to hide one.
"""

from __future__ import annotations

from aiohttp import web

from hubnode.node import Node

__all__ = ["NODE"]

NODE = web.AppKey("hubnode.node", Node)

