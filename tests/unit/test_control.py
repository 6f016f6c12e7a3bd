"""Control commands without Redis: validation, the envelope round trip, and the query that sends them."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from publisher.control import MAX_REASON, Command, command_of, pack_command, parse_conn_id
from publisher.core import control_query
from publisher.envelope import EnvelopeError, unpack
from publisher.keys import Keys
from publisher.message import MessageError
from publisher.query import Call, drive

BAD_COMMANDS: list[tuple[dict[str, Any], str]] = [
    ({"op": "kick", "user": "u1"}, "unknown control operation"),
    ({"op": "", "user": "u1"}, "unknown control operation"),
    ({"op": None, "user": "u1"}, "unknown control operation"),
    ({"op": "disconnect"}, "not both or neither"),
    ({"op": "disconnect", "user": "u1", "conn": "n1:1"}, "not both or neither"),
    ({"op": "join", "room": "r"}, "not both or neither"),
    ({"op": "disconnect", "user": "a b"}, "user id"),
    ({"op": "disconnect", "user": ""}, "user id"),
    ({"op": "disconnect", "user": "{u}"}, "user id"),
    ({"op": "disconnect", "user": "u" * 129}, "user id"),
    ({"op": "disconnect", "user": 7}, "user id"),
    ({"op": "disconnect", "conn": "n1"}, "connection id"),
    ({"op": "disconnect", "conn": "n1:"}, "connection id"),
    ({"op": "disconnect", "conn": ":3"}, "connection id"),
    ({"op": "disconnect", "conn": "n1:x"}, "connection id"),
    ({"op": "disconnect", "conn": "n1:-3"}, "connection id"),
    ({"op": "disconnect", "conn": "n1:٣"}, "connection id"),  # a digit, but not an ASCII one
    ({"op": "disconnect", "conn": "a b:1"}, "connection id"),
    ({"op": "disconnect", "conn": "{n1}:1"}, "connection id"),
    ({"op": "disconnect", "conn": 3}, "connection id"),
    ({"op": "disconnect", "user": "u1", "reason": "x" * (MAX_REASON + 1)}, "reason"),
    ({"op": "disconnect", "user": "u1", "reason": 5}, "reason"),
    ({"op": "disconnect", "user": "u1", "reason": None}, "reason"),
    ({"op": "disconnect", "user": "u1", "reconnect": "yes"}, "reconnect"),
    ({"op": "disconnect", "user": "u1", "reconnect": 1}, "reconnect"),
    ({"op": "disconnect", "user": "u1", "room": "r"}, "takes no room"),
    ({"op": "join", "user": "u1"}, "room name"),
    ({"op": "leave", "user": "u1"}, "room name"),
    ({"op": "join", "user": "u1", "room": ""}, "room name"),
    ({"op": "join", "user": "u1", "room": "a b"}, "room name"),
    ({"op": "leave", "user": "u1", "room": "r{1}"}, "room name"),
    ({"op": "join", "conn": "n1:1", "room": "r"}, "name a user"),
    ({"op": "leave", "conn": "n1:1", "room": "r"}, "name a user"),
]


@pytest.mark.parametrize(("fields", "says"), BAD_COMMANDS)
def test_invalid_commands_are_refused_when_built(fields: dict[str, Any], says: str) -> None:
    """A bad op, target, connection id, reason, reconnect flag or room raises MessageError (a ValueError)."""
    with pytest.raises(MessageError, match=says):
        Command(**fields)
    assert issubclass(MessageError, ValueError)


GOOD_COMMANDS = [
    Command("disconnect", user="alice"),
    Command("disconnect", user="alice", reason="account closed", reconnect=True),
    Command("disconnect", user="alice", reason="x" * MAX_REASON),
    Command("disconnect", conn="eu:n2:17", reason="bye"),
    Command("join", user="alice", room="lobby"),
    Command("leave", user="bob", room="ops:eu"),
]


@pytest.mark.parametrize("command", GOOD_COMMANDS)
def test_a_command_survives_the_envelope_round_trip(command: Command) -> None:
    """pack_command -> envelope.unpack -> command_of gives the same command; `ctl` is to_wire()."""
    mid, payload = pack_command(command, "pub:w1")
    envelope = unpack(payload)
    assert (envelope.id, envelope.origin) == (mid, "pub:w1") and mid
    assert envelope.control == command.to_wire()
    assert command_of(envelope.control) == command
    raw = msgpack.unpackb(payload)
    assert raw["v"] == 1 and "msg" not in raw and isinstance(raw["ts"], float)  # never mistaken for a message


def test_wire_form_carries_only_what_the_operation_uses() -> None:
    """disconnect carries reason and reconnect; join/leave carry the room; a connection command its conn."""
    assert Command("disconnect", user="u1").to_wire() == {"op": "disconnect", "user": "u1", "reason": "",
                                                          "reconnect": False}
    assert Command("disconnect", conn="n1:4", reconnect=True).to_wire() == {
        "op": "disconnect", "conn": "n1:4", "reason": "", "reconnect": True}
    assert Command("join", user="u1", room="r").to_wire() == {"op": "join", "user": "u1", "room": "r"}


def test_pack_command_keeps_a_given_envelope_id_and_draws_fresh_ones() -> None:
    """An explicit envelope id is kept (a retry resends it); without one every packing gets a new id."""
    command = Command("leave", user="u1", room="r")
    assert pack_command(command, "pub:x", "fixed-1")[0] == "fixed-1"
    assert unpack(pack_command(command, "pub:x", "fixed-1")[1]).id == "fixed-1"
    assert pack_command(command, "pub:x")[0] != pack_command(command, "pub:x")[0]


@pytest.mark.parametrize("raw", [None, [], "disconnect", {"op": "kick", "user": "u"}, {"user": "u"},
                                 {"op": "join", "user": "u"}, {"op": "disconnect", "user": "u", "reason": 3}])
def test_command_of_refuses_a_malformed_ctl_map(raw: Any) -> None:
    """A node decoding a `ctl` that is not a map, or not a valid command, gets MessageError."""
    with pytest.raises(MessageError):
        command_of(raw)


def test_unpack_refuses_a_control_envelope_without_origin_or_id() -> None:
    """A `ctl` envelope still needs string origin and id (the id is what makes a retry safe)."""
    ctl = Command("disconnect", user="u").to_wire()
    with pytest.raises(EnvelopeError):
        unpack(msgpack.packb({"v": 1, "origin": "o", "ctl": ctl}))
    with pytest.raises(EnvelopeError):
        unpack(msgpack.packb({"v": 1, "id": "i", "origin": "o", "ctl": ["disconnect"]}))


def test_commands_travel_on_the_channel_of_what_they_act_on() -> None:
    """A user's command goes on its user channel; a connection's on the node channel of its owner."""
    keys = Keys("p:")
    assert parse_conn_id("eu:n2:17") == "eu:n2"
    assert Command("join", user="u1", room="r").channel(keys) == "p:user:{u1}"
    assert Command("disconnect", conn="eu:n2:17").channel(keys) == keys.node_channel("eu:n2") == "p:node:{eu:n2}"


def _steps(command: Command, keys: Keys, sharded: bool, reply: Any) -> tuple[list[Any], int]:
    steps: list[Any] = []

    def execute(step: Any) -> Any:
        steps.append(step)
        return reply

    return steps, drive(control_query(command, "pub:w1", keys, sharded), execute)


@pytest.mark.parametrize(("sharded", "name"), [(False, "publish"), (True, "spublish")])
def test_control_query_is_one_plain_publish(sharded: bool, name: str) -> None:
    """One PUBLISH (SPUBLISH on a Redis Cluster) of the packed command on its channel; answers the reply."""
    keys = Keys("p:")
    for command in (Command("disconnect", user="u1", reason="r"), Command("disconnect", conn="n7:1"),
                    Command("join", user="u1", room="lobby")):
        steps, nodes = _steps(command, keys, sharded, 3)
        [step] = steps
        assert isinstance(step, Call) and step.name == name and step.kwargs is None
        channel, payload = step.args
        assert channel == command.channel(keys)
        envelope = unpack(payload)
        assert envelope.origin == "pub:w1" and command_of(envelope.control) == command
        assert nodes == 3


def test_control_query_answers_zero_when_nobody_holds_the_user() -> None:
    """The reply is the node count, an int: 0 means no node holds that user or connection."""
    assert _steps(Command("leave", user="ghost", room="r"), Keys(), False, 0)[1] == 0
