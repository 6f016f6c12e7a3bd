"""hubnode's wire contract and worker-side publisher.

The contract modules (message, names, keys, envelope, targets) need only
msgpack; the Redis-backed publishers are imported lazily so that importing
the contract never pulls in redis or asyncio.
"""

from __future__ import annotations

from typing import Any

from publisher.control import Command
from publisher.envelope import Envelope, EnvelopeError
from publisher.keys import DEFAULT_PREFIX, Keys
from publisher.message import Message, MessageError
from publisher.names import check_name, is_valid_name
from publisher.targets import Target

__all__ = [
    "DEFAULT_PREFIX", "AsyncPublisher", "Command", "Envelope", "EnvelopeError", "Keys", "Message",
    "MessageError", "Publisher", "RecordingPublisher", "Target", "check_name", "is_valid_name",
]

_LAZY = {
    "Publisher": "publisher.sync",
    "AsyncPublisher": "publisher.aio",
    "RecordingPublisher": "publisher.testing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
