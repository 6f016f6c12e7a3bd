"""hubnode: a horizontally scalable WebSocket hub on aiohttp and Redis pub/sub."""

from hubnode.app import create_app, mount
from hubnode.config import Config
from hubnode.node import Node
from publisher.message import Message

__all__ = ["Config", "Message", "Node", "create_app", "mount"]
__version__ = "0.1.0"
