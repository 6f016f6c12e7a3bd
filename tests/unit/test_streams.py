"""The pure history bookkeeping: positions, merge by offset, catching-up connections, recovery holds."""

from __future__ import annotations

import msgpack
import pytest

from hubnode.broker.streams import MemoryStreams
from hubnode.protocol import JoinRoom, ProtocolError, Since, parse_frame, since_param
from hubnode.streams import MAX_BUFFERED, Position, Streams, Verdict, contiguous, merge
from publisher.envelope import Envelope, pack, unpack
from publisher.history import HistoryPolicy, StreamRead, parse_patterns, splice, stream_of
from publisher.keys import Keys
from publisher.message import Message

CH = "hub:room:{r}"


def test_live_messages_advance_drop_repeats_and_reveal_gaps() -> None:
    """In order: deliver; at or below the position: drop; beyond position + 1: a gap, held for recovery."""
    s = Streams()
    s.track(CH)
    assert s.live(CH, 5, "e", "m5") is Verdict.DELIVER  # the first message sets the position
    assert s.live(CH, 6, "e", "m6") is Verdict.DELIVER
    assert s.live(CH, 6, "e", "m6") is Verdict.DROP
    assert s.live(CH, 4, "e", "m4") is Verdict.DROP
    assert s.live(CH, 9, "e", "m9") is Verdict.GAP
    assert s.live(CH, 10, "e", "m10") is Verdict.HOLD  # held behind the gap, in arrival order
    assert s.position(CH) == Position("e", 6)
    assert s.recovery_start(CH) == Position("e", 6)
    assert [i[0] for i in s.end_recovery(CH, lost=False)] == [9, 10]


def test_a_new_epoch_is_taken_as_it_comes() -> None:
    """A stream recreated after a loss restarts at offset 1: not a repeat, not a gap."""
    s = Streams()
    s.track(CH)
    s.live(CH, 40, "old", None)
    assert s.live(CH, 1, "new", None) is Verdict.DELIVER
    assert s.position(CH) == Position("new", 1)


def test_a_catching_up_connection_buffers_then_skips_up_to_its_floor_then_is_plain() -> None:
    """While its read is in flight it gets nothing on the socket; after it, live copies up to the floor are skipped."""
    s = Streams()
    s.track(CH)
    s.live(CH, 1, "e", None)
    s.begin_sync(CH, "c")
    assert s.syncing(CH) is not None
    s.live(CH, 2, "e", "m2")
    assert not s.passes(CH, "c", 2, "e")  # buffering
    assert s.buffered(CH, "c") == [(2, "e", "m2")]
    s.settle(CH, "c", Position("e", 4))  # the read reached 4; 3 and 4 are still in flight live
    assert not s.passes(CH, "c", 3, "e")
    assert not s.passes(CH, "c", 4, "e")  # the floor itself: skipped, and from now on the connection is plain
    assert s.syncing(CH) is None
    assert s.passes(CH, "c", 5, "e")


def test_settle_on_a_channel_already_past_the_floor_goes_plain_at_once() -> None:
    s = Streams()
    s.track(CH)
    s.begin_sync(CH, "c")
    s.live(CH, 7, "e", None)
    s.settle(CH, "c", Position("e", 7))
    assert s.syncing(CH) is None


def test_buffer_overflow_is_reported_not_grown() -> None:
    s = Streams()
    s.track(CH)
    s.begin_sync(CH, "c")
    for n in range(1, MAX_BUFFERED + 2):
        s.live(CH, n, "e", None)
    assert s.overflowed(CH, "c") and s.buffered(CH, "c") == []


def test_merge_replays_above_the_start_then_the_buffer_above_the_replay_once_each() -> None:
    """Replay 4-6, then buffered live 5-8 (5 and 6 repeats, 8 before 7 by arrival): 7 and 8, in offset order."""
    entries = [(n, "e", f"r{n}") for n in (3, 4, 5, 6)]
    buffered = [(5, "e", "b5"), (8, "e", "b8"), (6, "e", "b6"), (7, "e", "b7"), (7, "e", "b7")]
    merged = merge(entries, buffered, 3, "e")
    assert [i[0] for i in merged.replay] == [4, 5, 6] and merged.last == 6
    assert [i[2] for i in merged.after] == ["b7", "b8"]


def test_merge_without_replay_reports_the_start_and_keeps_a_newer_epoch() -> None:
    merged = merge([], [(2, "e", "old"), (1, "f", "new")], 2, "e")
    assert merged.replay == [] and merged.last == 2 and [i[2] for i in merged.after] == ["new"]


def test_recovery_reads_from_the_lowest_floor_when_no_live_message_was_seen() -> None:
    s = Streams()
    s.track(CH)
    for conn, floor in (("a", 9), ("b", 4)):
        s.begin_sync(CH, conn)
        s.settle(CH, conn, Position("e", floor))
    assert s.begin_recovery(CH)
    assert not s.begin_recovery(CH)  # a second loss during the read: read again
    assert s.read_again(CH)
    assert s.recovery_start(CH) == Position("e", 4) and not s.read_again(CH)


def test_an_unrecoverable_channel_forgets_its_position_but_floors_still_skip_repeats() -> None:
    """After a failed recovery the position is unknown; a member at a floor still skips what it got."""
    s = Streams()
    s.track(CH)
    s.live(CH, 3, "e", None)
    s.begin_sync(CH, "floor")
    s.settle(CH, "floor", Position("e", 5))
    s.begin_sync(CH, "reading")
    s.begin_recovery(CH)
    s.live(CH, 9, "e", "m9")
    assert s.catching_up(CH) == {"reading"}
    assert [i[0] for i in s.end_recovery(CH, lost=True)] == [9]
    assert s.position(CH) is None
    assert not s.passes(CH, "floor", 4, "e") and s.passes(CH, "floor", 6, "e")


def test_a_plain_member_with_an_unknown_position_makes_the_next_loss_unrecoverable() -> None:
    s = Streams()
    s.track(CH)
    s.live(CH, 3, "e", None)
    s.begin_recovery(CH)
    s.end_recovery(CH, lost=True)
    assert s.members_unknown(CH, ["plain"])
    s.live(CH, 4, "e", None)
    assert not s.members_unknown(CH, ["plain"])


def test_a_loss_while_a_connection_reads_taints_it_and_a_hole_is_not_contiguous() -> None:
    """A recovery or a gap while a connection's read is in flight means its buffer may have a hole."""
    s = Streams()
    s.track(CH)
    s.live(CH, 1, "e", None)
    s.begin_sync(CH, "c")
    assert not s.tainted(CH, "c")
    s.live(CH, 4, "e", "m4")  # 2 and 3 lost: a gap
    assert s.tainted(CH, "c")
    s.untaint(CH, "c")
    s.end_recovery(CH, lost=False)
    s.begin_recovery(CH)
    assert s.tainted(CH, "c")
    assert contiguous([(4, "e", None), (3, "e", None)], 2, "e")
    assert not contiguous([(4, "e", None)], 2, "e")
    assert contiguous([(1, "f", None)], 2, "e") and contiguous([], 2, "e")


def test_a_second_join_in_flight_keeps_the_first_ones_buffer() -> None:
    s = Streams()
    s.track(CH)
    s.begin_sync(CH, "c")
    s.live(CH, 1, "e", "m1")
    s.begin_sync(CH, "c")
    assert s.buffered(CH, "c") == [(1, "e", "m1")]
    s.settle(CH, "c", Position("e", 1))
    assert s.buffered(CH, "c") is None and s.conn_position(CH, "c") == Position("e", 1)


def test_untracked_channels_are_not_recovered() -> None:
    s = Streams()
    assert not s.tracked(CH) and not s.begin_recovery(CH) and s.syncing(CH) is None
    s.track(CH)
    s.untrack([CH])
    assert not s.tracked(CH)


# -- wire: since, patterns, the splice of lua/publish.lua --------------------------------

@pytest.mark.parametrize("since", ["3", [3], {"offset": "3", "epoch": "e"}, {"offset": -1, "epoch": "e"},
                                   {"offset": 1.5, "epoch": "e"}, {"offset": True, "epoch": "e"},
                                   {"offset": 3, "epoch": 7}, {"offset": 3, "epoch": ""},
                                   {"offset": 3, "epoch": "x" * 65}, {"offset": 3}])
def test_malformed_since_is_bad_message(since: object) -> None:
    frame = parse_frame(__import__("orjson").dumps({"type": "join_room", "id": 1,
                                                    "data": {"room": "r", "since": since}}))
    assert isinstance(frame, ProtocolError) and frame.code == "bad_message" and frame.id == 1


def test_join_room_takes_a_plain_name_or_an_object_with_since() -> None:
    assert parse_frame('{"type":"join_room","data":"r"}') == JoinRoom("r")
    assert parse_frame('{"type":"join_room","data":{"room":"r"}}') == JoinRoom("r")
    assert parse_frame('{"type":"join_room","data":{"room":"r","since":{"offset":0,"epoch":"e"}}}') == \
        JoinRoom("r", None, Since(0, "e"))


@pytest.mark.parametrize(("text", "ok"), [("0:e", True), ("12:ab:cd", True), ("12", False), (":e", False),
                                          ("-1:e", False), ("1:", False), ("١:e", False), ("1.5:e", False)])
def test_since_query_parameter(text: str, ok: bool) -> None:
    assert isinstance(since_param(text), Since) is ok


def test_history_rooms_patterns() -> None:
    policy = HistoryPolicy(size=3, rooms=parse_patterns("chat-*, news"))
    assert policy.covers("room", "chat-1") and policy.covers("room", "news") and not policy.covers("room", "newsx")
    assert policy.covers("user", "u") and not HistoryPolicy(size=3, users=False).covers("user", "u")
    assert not HistoryPolicy().covers("room", "chat-1")  # size 0: off
    for bad in ("", "a*b", "*x*", "a b"):
        with pytest.raises(ValueError):
            parse_patterns(bad)


def test_policy_reads_the_nodes_environment_variables() -> None:
    policy = HistoryPolicy.from_env({"HUB_HISTORY_SIZE": "50", "HUB_HISTORY_TTL": "9",
                                     "HUB_HISTORY_ROOMS": "a*", "HUB_HISTORY_USERS": "off"})
    assert policy == HistoryPolicy(50, 9, ("a*",), False)
    assert HistoryPolicy.resolve(size=2, env={"HUB_HISTORY_SIZE": "50"}).size == 2
    with pytest.raises(ValueError, match="HUB_HISTORY_SIZE"):
        HistoryPolicy.from_env({"HUB_HISTORY_SIZE": "many"})


@pytest.mark.parametrize("extra", [0, 20])
def test_splice_adds_offset_and_epoch_to_any_map(extra: int) -> None:
    """fixmap and map16 envelopes both gain the two fields, everything else unchanged."""
    raw = msgpack.unpackb(pack(Envelope(Message("t", 1), "pub:x", id="i")))
    raw.update({f"x{i}": i for i in range(extra)})
    spliced = msgpack.unpackb(splice(msgpack.packb(raw), 7, "ep"))
    assert spliced == {**raw, "offset": 7, "epoch": "ep"}
    env = unpack(splice(msgpack.packb(raw), 7, "ep"))
    assert (env.offset, env.epoch) == (7, "ep")


def test_an_envelope_with_a_malformed_position_is_delivered_without_one() -> None:
    raw = msgpack.unpackb(pack(Envelope(Message("t", 1), "pub:x", id="i")))
    for offset, epoch in ((0, "e"), ("1", "e"), (True, "e"), (1, 5), (1, "")):
        env = unpack(msgpack.packb({**raw, "offset": offset, "epoch": epoch}))
        assert env.offset is None and env.epoch is None and env.msg.data == 1


def test_memory_streams_expire_and_start_a_new_epoch() -> None:
    """--history-ttl after the last publish the stream is gone; the next publish starts at offset 1, new epoch."""
    streams, ref = MemoryStreams(), stream_of(Keys(), "room", "r")
    payload = pack(Envelope(Message("t", 1), "pub:x", id="i"))
    first = unpack(streams.append(ref, payload, "a", 3, 10, now=0.0) or b"")
    assert first.offset == 1
    assert streams.read(ref, 0, 0, None, now=9.9).top == 1
    assert streams.read(ref, 0, 0, None, now=10.0) == StreamRead(None, 0, 0)
    second = unpack(streams.append(ref, payload, "b", 3, 10, now=11.0) or b"")
    assert second.offset == 1 and second.epoch != first.epoch
