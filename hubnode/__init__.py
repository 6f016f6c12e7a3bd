"""hubnode: a horizontally scalable WebSocket hub on aiohttp and Redis pub/sub.

The public names are imported lazily so that the pure core (config, protocol,
routing, policy) can be imported without pulling in asyncio or aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hubnode.app import create_app, mount
    from hubnode.client import HubClient
    from hubnode.config import Config
    from hubnode.node import Node
    from publisher.message import Message

__all__ = ["Config", "HubClient", "Message", "Node", "create_app", "mount"]
__version__ = "0.2.0"

_LAZY = {
    "Config": "hubnode.config",
    "HubClient": "hubnode.client",
    "Message": "publisher.message",
    "Node": "hubnode.node",
    "create_app": "hubnode.app",
    "mount": "hubnode.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
