"""The wire contract: Message JSON shape, names, keys and the msgpack envelope."""

from __future__ import annotations

import msgpack
import pytest

from publisher.envelope import Envelope, EnvelopeError, pack, unpack
from publisher.keys import Keys
from publisher.message import Message, MessageError
from publisher.names import check_name, is_valid_name
from publisher.targets import Target, coerce_message, target_of


def test_absent_fields_are_omitted() -> None:
    """Optional fields that are unset do not appear on the wire (not even as null)."""
    assert Message("t", None, timestamp=1).to_wire() == {"type": "t", "data": None, "timestamp": 1}
    full = Message("t", 1, room="r", user_id="u", timestamp=2, metadata={"a": 1}, id=3).to_wire()
    assert full == {"type": "t", "data": 1, "room": "r", "user_id": "u", "timestamp": 2,
                    "metadata": {"a": 1}, "id": 3}


def test_timestamp_filled_when_unset() -> None:
    """A message without a timestamp gets the current Unix time on the wire."""
    assert Message("t").to_wire()["timestamp"] > 1_700_000_000


@pytest.mark.parametrize("raw", [None, [], {}, {"type": ""}, {"type": 1}, {"type": "t", "room": "a b"},
                                 {"type": "t", "user_id": ""}, {"type": "t", "metadata": 1},
                                 {"type": "t", "timestamp": "x"}, {"type": "t", "id": 1.5}])
def test_from_wire_rejects_bad_messages(raw: object) -> None:
    """Message.from_wire raises MessageError (a ValueError) for each broken field."""
    with pytest.raises(MessageError):
        Message.from_wire(raw)


def test_from_wire_treats_null_as_absent() -> None:
    """Publishers in other languages may send nulls for absent fields."""
    msg = Message.from_wire({"type": "t", "room": None, "user_id": None, "data": 1})
    assert msg.room is None and msg.user_id is None


@pytest.mark.parametrize("name", ["a", "room-1", "ü", "x" * 128, "a:b/c"])
def test_valid_names(name: str) -> None:
    """Ordinary names, unicode and colons are fine."""
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", "x" * 129, "a b", "a\tb", "a{b", "}", "a\x00", "\x85", 5, None])
def test_invalid_names(name: object) -> None:
    """Empty, too long, whitespace, control characters and braces are refused."""
    assert check_name(name) is not None


def test_keys_follow_protocol_section_7() -> None:
    """Every channel and key name has the documented shape."""
    k = Keys("hub:")
    assert k.all == "hub:all"
    assert k.node_channel("n1") == "hub:node:{n1}"
    assert k.room_channel("r") == "hub:room:{r}"
    assert k.user_channel("u") == "hub:user:{u}"
    assert k.members("r") == "hub:members:{r}"
    assert (k.online("u"), k.nodes) == ("hub:online:{u}", "hub:nodes")
    assert k.node("n1") == "hub:node:{n1}"
    assert k.node_rooms("n1") == "hub:node:{n1}:rooms"
    assert k.node_users("n1") == "hub:node:{n1}:users"
    assert k.node_conns("n1") == "hub:node:{n1}:conns"
    assert k.node_metrics("n1") == "hub:node:{n1}:metrics"
    assert k.parse_channel("hub:room:{r}") == ("room", "r")
    assert k.parse_channel("hub:user:{u}") == ("user", "u")
    assert k.parse_channel("hub:all") == ("all", "")
    assert k.parse_channel("hub:node:{n1}") == ("node", "n1")
    assert k.parse_channel("hub:node:n1") is None
    assert k.parse_channel("other:all") is None


def test_envelope_round_trip() -> None:
    """pack then unpack gives back the message, origin and exclusion."""
    env = Envelope(Message("t", {"x": [1, 2]}, room="r", timestamp=9), origin="pub:1", exclude="n:3")
    back = unpack(pack(env))
    assert back.msg == env.msg and back.origin == "pub:1" and back.exclude == "n:3" and back.id


def test_envelope_is_a_plain_msgpack_map() -> None:
    """Any language can build the payload: a msgpack map with v, id, origin, msg."""
    raw = msgpack.unpackb(pack(Envelope(Message("t", 1, timestamp=1), origin="o", id="i")))
    assert raw["v"] == 1 and raw["id"] == "i" and raw["origin"] == "o"
    assert raw["msg"] == {"type": "t", "data": 1, "timestamp": 1}


@pytest.mark.parametrize("payload", [
    b"\xc1", b"garbage", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "id": "i", "origin": "o",
                                                              "msg": {"type": "t"}}),
    msgpack.packb({"v": 1, "id": "i", "origin": "o", "msg": {"type": 5}}),
    msgpack.packb({"v": 1, "id": 5, "origin": "o", "msg": {"type": "t"}}),
])
def test_bad_envelopes_raise_envelope_error(payload: bytes) -> None:
    """Undecodable payloads and unknown versions raise EnvelopeError, nothing else."""
    with pytest.raises(EnvelopeError):
        unpack(payload)


def test_target_rules() -> None:
    """room wins over user_id, user_id over all; names are validated."""
    assert target_of(Message("t", room="r", user_id="u")) == Target("room", "r")
    assert target_of(Message("t", user_id="u")) == Target("user", "u")
    assert target_of(Message("t")) == Target("all")
    with pytest.raises(ValueError):
        Target("room", "a b")
    assert Target("user", "u").channel(Keys("p:")) == "p:user:{u}"


def test_coerce_message_accepts_dicts_and_stamps_time() -> None:
    """A dict with the seed's fields becomes a validated, timestamped Message."""
    msg = coerce_message({"type": "t", "data": 1})
    assert msg.timestamp > 0 and msg.data == 1
    with pytest.raises(ValueError):
        coerce_message({"data": 1})
    with pytest.raises(ValueError):
        coerce_message(42)  # type: ignore[arg-type]
