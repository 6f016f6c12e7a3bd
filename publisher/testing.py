"""`RecordingPublisher`: a Publisher for your tests that records instead of sending.

It *is* a `Publisher` (a subclass), so it fits wherever your code expects
one, and a publish goes through exactly the same validation and packing:
only the final PUBLISH is replaced by a note in `published`. Each note is
decoded back from the envelope bytes, so what you assert on is what a node
would receive.

    from publisher.testing import RecordingPublisher

    def test_order_shipped_notifies_the_customer():
        hub = RecordingPublisher()
        ship_order(42, hub=hub)                      # your code under test
        [note] = hub.to_user("customer-7")
        assert note.type == "order_shipped" and note.data == {"order": 42}

Control commands (`disconnect_user`, `join_user`, `leave_user`,
`disconnect_connection`) are recorded in `commands`, each decoded back from
its envelope too:

    hub.disconnect_user("customer-7", reason="account closed")
    assert hub.commands == [Command("disconnect", user="customer-7", reason="account closed")]

A bad message or command raises the same ValueError as with a real
Publisher, and nothing is recorded. The inspection methods (`rooms()`,
`nodes()`, `presence()`, ...) raise NotImplementedError: there is no Redis
behind a recorder, and an invented answer would pass tests it should not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import redis

from publisher.control import Command, command_of
from publisher.envelope import Envelope, unpack
from publisher.history import PUBLISH_SCRIPT
from publisher.message import Message
from publisher.query import Call, ScriptCall, Step
from publisher.sync import Publisher
from publisher.targets import Kind, Target

__all__ = ["Published", "RecordingPublisher"]


@dataclass(frozen=True, slots=True)
class Published:
    """One recorded publish: where it went, what it said, and the exact bytes."""

    target: Target
    message: Message
    channel: str
    envelope: Envelope
    payload: bytes


class _NoRedis:
    """Stands in for the client a RecordingPublisher never has."""


class RecordingPublisher(Publisher):
    """A Publisher whose publishes are recorded in order, never sent.

    Every publish and every control command returns `node_count` (default
    1), as if that many nodes had taken it; set it to 0 to test your code's
    "nobody listening" (or "user not connected") path.
    """

    def __init__(self, *, key_prefix: str | None = None, origin_id: str | None = None,
                 node_count: int = 1) -> None:
        super().__init__(key_prefix=key_prefix, origin_id=origin_id,
                         client=cast(redis.Redis, _NoRedis()))
        self.node_count = node_count
        self.published: list[Published] = []
        self.commands: list[Command] = []  # control commands, in the order they were sent

    # -- what was published ----------------------------------------------------
    def messages(self, kind: Kind | None = None, name: str | None = None) -> list[Message]:
        """Recorded messages in publish order, optionally only those to one kind/target."""
        return [p.message for p in self.published
                if (kind is None or p.target.kind == kind) and (name is None or p.target.name == name)]

    def to_all(self) -> list[Message]:
        """Messages sent with broadcast_to_all (or Target("all"))."""
        return self.messages("all")

    def to_room(self, room: str) -> list[Message]:
        """Messages sent to `room`."""
        return self.messages("room", room)

    def to_user(self, user_id: str) -> list[Message]:
        """Messages sent to user `user_id`."""
        return self.messages("user", user_id)

    def clear(self) -> None:
        """Forget everything recorded so far, publishes and commands (e.g. between phases of one test)."""
        self.published.clear()
        self.commands.clear()

    # -- the one overridden step -------------------------------------------------
    def _execute(self, step: Step) -> Any:
        if self._client is None:
            raise RuntimeError(f"{self!r} is closed")
        if isinstance(step, list):
            return [self._record(call) for call in step]
        return self._record(step)

    def _record(self, call: Call | ScriptCall) -> int:
        if isinstance(call, ScriptCall) and call.script is PUBLISH_SCRIPT:
            channel, payload = call.args[0], call.args[1]  # a room or user publish, through the history script
        elif isinstance(call, Call) and call.name == "publish":
            channel, payload = call.args
        else:
            name = call.script.name if isinstance(call, ScriptCall) else call.name
            raise NotImplementedError(
                f"RecordingPublisher has no Redis: {name}() cannot be answered; "
                "use a real Publisher to inspect a hub")
        envelope = unpack(payload)
        if envelope.control is not None:  # a control command (core.control_query), on a user or node channel
            command = command_of(envelope.control)
            assert channel == command.channel(self.keys), channel  # core sends it where its nodes listen
            self.commands.append(command)
            return self.node_count
        parsed = self.keys.parse_channel(channel)
        assert parsed is not None and parsed[0] != "node", channel  # core only targets all/room/user
        target = Target(cast(Kind, parsed[0]), parsed[1])
        self.published.append(Published(target, envelope.msg, channel, envelope, payload))
        return self.node_count
