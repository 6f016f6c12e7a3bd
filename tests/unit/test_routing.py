"""Routing table: joins, leaves, disconnect clean-up and the changes they return."""

from __future__ import annotations

import pytest

from hubnode.routing import RoutingTable
from publisher.keys import Keys

K = Keys("hub:")


@pytest.fixture
def table() -> RoutingTable:
    return RoutingTable(K)


def test_add_user_subscribes_user_channel_once(table: RoutingTable) -> None:
    """The first connection of a user needs the user channel; the second does not."""
    assert table.add("n:1", "alice").subscribe == ("hub:user:{alice}",)
    assert table.add("n:2", "alice").subscribe == ()
    assert table.subscribers("hub:user:{alice}") == {"n:1", "n:2"}


def test_anonymous_connection_has_no_user_channel(table: RoutingTable) -> None:
    """An anonymous connection subscribes nothing until it joins a room."""
    change = table.add("n:1", None)
    assert change.subscribe == () and change.changed
    assert table.channels() == []


def test_duplicate_add_is_refused(table: RoutingTable) -> None:
    """Registering the same connection id twice is a programming error."""
    table.add("n:1", None)
    with pytest.raises(ValueError):
        table.add("n:1", None)


def test_join_first_member_subscribes_and_is_idempotent(table: RoutingTable) -> None:
    """The first join of a room asks for its channel; a repeated join changes nothing."""
    table.add("n:1", None)
    table.add("n:2", None)
    first = table.join("n:1", "r")
    assert first.subscribe == ("hub:room:{r}",) and first.changed
    assert table.join("n:1", "r").changed is False
    second = table.join("n:2", "r")
    assert second.subscribe == () and second.changed
    assert table.room_members("r") == {"n:1", "n:2"}
    assert table.rooms() == {"r": 2}


def test_leave_last_member_releases_channel(table: RoutingTable) -> None:
    """Only the last member's leave releases the room channel; the room disappears."""
    for c in ("n:1", "n:2"):
        table.add(c, None)
        table.join(c, "r")
    first = table.leave("n:1", "r")
    assert first.release == () and first.emptied == ()
    change = table.leave("n:2", "r")
    assert change.release == ("hub:room:{r}",) and change.rooms == ("r",) and change.emptied == ("r",)
    assert table.rooms() == {}
    assert not table.in_use("hub:room:{r}")


def test_leave_room_not_joined_changes_nothing(table: RoutingTable) -> None:
    """Leaving a room one is not in is not an error and changes nothing."""
    table.add("n:1", None)
    assert table.leave("n:1", "nowhere").changed is False
    assert table.leave("unknown", "nowhere").changed is False


def test_remove_leaves_every_room_and_user(table: RoutingTable) -> None:
    """A disconnect releases every channel that only it needed and reports its rooms."""
    table.add("n:1", "alice")
    table.add("n:2", "bob")
    for room in ("a", "b"):
        table.join("n:1", room)
    table.join("n:2", "b")
    change = table.remove("n:1")
    assert set(change.release) == {"hub:room:{a}", "hub:user:{alice}"}
    assert change.rooms == ("a", "b") and change.emptied == ("a",)
    assert table.rooms() == {"b": 1}
    assert "n:1" not in table and len(table) == 1
    assert table.remove("n:1").changed is False


def test_connections_snapshot(table: RoutingTable) -> None:
    """The snapshot lists every connection with its user and rooms, for re-registration."""
    table.add("n:1", "alice")
    table.join("n:1", "r")
    table.add("n:2", None)
    assert sorted(table.connections()) == [("n:1", "alice", frozenset({"r"})),
                                           ("n:2", None, frozenset())]
    assert table.users() == {"alice": 1}
