"""The client's memory across connections (hubnode.client.state), with plain calls: no loop, no network."""

from __future__ import annotations

from hubnode.client.state import MemberLists, Position, Streams


def msg(room: str | None, offset: int, epoch: str = "e1") -> dict[str, object]:
    frame: dict[str, object] = {"type": "room_message", "offset": offset, "epoch": epoch}
    if room is not None:
        frame["room"] = room
    return frame


def connected_in(streams: Streams, room: str, offset: int = 0, epoch: str = "e1") -> None:
    """A first connection that joined `room` at (offset, epoch)."""
    streams.connecting()
    streams.connected({"user_id": "u", "offset": 0, "epoch": "u1"}, False, None)
    streams.rooms.add(room)
    data, rejoin, sent = streams.join_data(room, None)
    assert (data, rejoin, sent) == (room, False, None)
    assert streams.joined(room, {"offset": offset, "epoch": epoch}, rejoin, sent) is None


def test_a_message_at_or_below_the_position_is_a_duplicate() -> None:
    streams = Streams()
    connected_in(streams, "r")
    assert [streams.track(msg("r", n)) for n in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert streams.position("r") == Position(3, "e1")
    assert streams.track(msg("r", 1, epoch="e2")) and streams.position("r") == Position(1, "e2")  # new epoch
    assert streams.track(msg("elsewhere", 1)) and streams.position("elsewhere") is None  # not a room we are in


def test_a_rejoin_carries_since_and_its_ack_says_recovered() -> None:
    streams = Streams()
    connected_in(streams, "r")
    streams.track(msg("r", 4))
    assert streams.connecting() == Position(0, "u1")  # the user stream's position goes in the URL
    assert streams.connected({"user_id": "u", "offset": 0, "epoch": "u1", "recovered": True}, True, "u") == {
        "type": "recovered", "stream": "user", "room": None, "user_id": "u", "recovered": True,
        "offset": 0, "epoch": "u1"}
    data, rejoin, sent = streams.join_data("r", None)
    assert data == {"room": "r", "since": {"offset": 4, "epoch": "e1"}} and rejoin and sent == Position(4, "e1")
    assert streams.track(msg("r", 5))  # replayed before the ack
    event = streams.joined("r", {"offset": 5, "epoch": "e1", "recovered": True}, rejoin, sent)
    assert event == {"type": "recovered", "stream": "room", "room": "r", "recovered": True, "offset": 5,
                     "epoch": "e1"}
    assert not streams.track(msg("r", 5))  # its live copy


def test_an_ack_that_cannot_recover_starts_the_stream_over() -> None:
    streams = Streams()
    connected_in(streams, "r")
    streams.track(msg("r", 9))
    streams.connecting()
    streams.connected({"user_id": "u", "offset": 0, "epoch": "u2", "recovered": False}, True, "u")
    data, rejoin, sent = streams.join_data("r", None)
    event = streams.joined("r", {"offset": 2, "epoch": "e2", "recovered": False}, rejoin, sent)
    assert event is not None and event["recovered"] is False and streams.position("r") == Position(2, "e2")
    assert streams.position() == Position(0, "u2")  # the user stream starts over too


def test_a_server_join_is_rejoined_from_its_position_and_a_leave_forgets_it() -> None:
    streams = Streams()
    connected_in(streams, "mine")
    streams.server_joined("theirs", {"event": "joined", "room": "theirs", "offset": 7, "epoch": "t"})
    assert streams.rooms == {"mine", "theirs"} and streams.position("theirs") == Position(7, "t")
    streams.connecting()
    streams.connected({"user_id": "u"}, True, "u")
    assert streams.join_data("theirs", None)[0] == {"room": "theirs", "since": {"offset": 7, "epoch": "t"}}
    streams.forget("theirs")
    assert streams.rooms == {"mine"} and streams.position("theirs") is None


def test_an_application_position_goes_in_a_first_join() -> None:
    streams = Streams()
    streams.connecting()
    streams.connected({"user_id": None}, False, None)
    streams.rooms.add("r")
    data, rejoin, sent = streams.join_data("r", Position(3, "e"))
    assert data == {"room": "r", "since": {"offset": 3, "epoch": "e"}} and not rejoin
    event = streams.joined("r", {"offset": 3, "epoch": "e", "recovered": True}, rejoin, sent)
    assert event is not None and event["recovered"] is True


def test_member_lists_apply_events_that_arrive_during_the_query_in_order() -> None:
    lists = MemberLists()
    serial = lists.ask("r")
    assert lists.event("r", {"event": "join", "user_id": "b"}) is None  # kept for the answer
    assert lists.event("r", {"event": "leave", "user_id": "a"}) is None
    event = lists.answered("r", serial, {"a": 2}, 1)
    assert event == {"type": "members", "room": "r", "change": None, "users": {"b": 1}, "anonymous": 1}
    change = lists.event("r", {"event": "join", "user_id": "c"})
    assert change is not None and change["change"] == {"event": "join", "user_id": "c"}
    assert lists.members("r") == {"users": {"b": 1, "c": 1}, "anonymous": 1}
    assert lists.event("r", {"event": "join", "user_id": "c"}) is not None  # again: changes nothing
    assert lists.members("r") == {"users": {"b": 1, "c": 1}, "anonymous": 1}


def test_a_later_query_wins_and_bad_events_are_ignored() -> None:
    lists = MemberLists()
    old = lists.ask("r")
    new = lists.ask("r")
    assert lists.answered("r", old, {"stale": 1}, 0) is None
    assert lists.answered("r", new, {"fresh": 1}, 0) is not None
    assert lists.members("r") == {"users": {"fresh": 1}, "anonymous": 0}
    assert lists.event("r", {"event": "wave", "user_id": "x"}) is None
    assert lists.event("r", {"event": "join"}) is None
    assert lists.event("other", {"event": "join", "user_id": "x"}) is None
    lists.forget("r")
    assert lists.members("r") is None


def test_an_ack_behind_the_replayed_messages_keeps_the_position() -> None:
    """Replayed messages (before the ack) moved the position past the ack's offset: it stays there."""
    streams = Streams()
    connected_in(streams, "r")
    streams.track(msg("r", 2))
    streams.connecting()
    streams.connected({"user_id": "u"}, True, "u")
    data, rejoin, sent = streams.join_data("r", None)
    assert streams.track(msg("r", 3)) and streams.track(msg("r", 4))  # replayed
    event = streams.joined("r", {"offset": 3, "epoch": "e1", "recovered": True}, rejoin, sent)
    assert event is not None and event["offset"] == 4 and streams.position("r") == Position(4, "e1")
    assert not streams.track(msg("r", 4)) and streams.track(msg("r", 5))
