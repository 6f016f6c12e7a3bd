"""The membership changes as single-slot phases (hubnode.membership.changes), driven by hand."""

from __future__ import annotations

from typing import Any

import pytest

from hubnode.membership.changes import REFUSED, Change, Changes, Step, groups, no_events, one_slot
from publisher.keys import Keys

CHANGES = Changes(Keys("hub:"), "node-1")


def run(change: Change, *answers: Any) -> tuple[list[list[Step]], Any]:
    """Drive a plan: each phase's steps are answered with `answers[phase]` (one answer per step)."""
    phases: list[list[Step]] = []
    plan = change.plan
    try:
        steps = next(plan)
        for answer in answers:
            phases.append(steps)
            steps = plan.send([answer] * len(steps))
        phases.append(steps)
    except StopIteration as done:
        return phases, done.value
    raise AssertionError(f"the plan wants more phases than answered: {phases}")


@pytest.mark.parametrize("user", ["alice", "ü-x", "node-1"])
@pytest.mark.parametrize("room", ["lobby", "r:1", "room-with-a-long-name" * 5])
def test_every_step_of_every_change_touches_one_slot(user: str, room: str) -> None:
    """Whatever the names, each step's keys hash to one Redis Cluster slot (braces in names included)."""
    changes = [CHANGES.connect("node-1:1", user, 3), CHANGES.join(room, "node-1:1", user),
               CHANGES.leave(room, "node-1:1", True), CHANGES.disconnect("node-1:1", user, [room, "x"], [room])]
    for change in changes:
        phases, _ = run(change, 1, 1, 1)
        for step in (s for phase in phases for s in phase):
            assert one_slot(step.keys), step
    assert one_slot(["hub:node:{n}", "hub:node:{n}:conns"]) and not one_slot(["hub:nodes", "hub:node:{n}"])


def test_a_connect_adds_to_the_node_first_then_the_user() -> None:
    """connect: the node-slot count, then the user's online hash; an anonymous one stops after the node."""
    phases, result = run(CHANGES.connect("node-1:1", "alice", 5), 1, 1)
    assert [[s.name for s in phase] for phase in phases] == [["node_connect"], ["user_connect"]]
    assert phases[1][0] == Step("user_connect", ("hub:online:{alice}",), ("node-1:1", "node-1", 5))
    assert result == 1
    phases, result = run(CHANGES.connect("node-1:2", "", 0), 2)
    assert len(phases) == 1 and result == 2


def test_a_refused_connect_undoes_its_node_count() -> None:
    """At the limit the user step refuses; the node step is undone in phase 3 unless counted before."""
    phases, result = run(CHANGES.connect("node-1:1", "alice", 1), 1, REFUSED, 1)
    assert result == REFUSED and [s.name for s in phases[2]] == ["node_disconnect"]
    phases, result = run(CHANGES.connect("node-1:1", "alice", 1), 2, REFUSED)
    assert result == REFUSED and len(phases) == 2


def test_a_join_writes_the_member_only_when_the_node_step_allows() -> None:
    """join: index first; no member for a closed connection (0) or an unregistered node (-1)."""
    phases, result = run(CHANGES.join("r", "node-1:1", "u"), 1, 1)
    member_keys = ("hub:members:{r}", "hub:presence:{r}")
    assert phases[1] == [Step("member_add", member_keys, (*no_events("r"), "node-1:1", "u"))] and result == 1
    node_keys = ("hub:node:{node-1}", "hub:node:{node-1}:conns", "hub:node:{node-1}:rooms")
    assert run(CHANGES.join("r", "node-1:1", "u"), 0) == ([[Step("node_join", node_keys, ("node-1:1", "r"))]], 1)
    assert run(CHANGES.join("r", "node-1:1", "u"), -1)[1] == -1


def test_leave_and_disconnect_remove_from_the_index_last() -> None:
    """leave and disconnect: nothing in phase 1, the hashes in phase 2, the node's index in phase 3."""
    phases, result = run(CHANGES.leave("r", "node-1:1", True), None, 1, 1)
    assert [[s.name for s in p] for p in phases] == [[], ["member_remove"], ["node_leave"]] and result == 1
    assert len(run(CHANGES.leave("r", "node-1:1", False), None, 1)[0]) == 2
    phases, result = run(CHANGES.disconnect("node-1:1", "u", ["a", "b"], ["b"]), None, 1, 1)
    assert [s.keys[0] for s in phases[1]] == ["hub:members:{a}", "hub:members:{b}", "hub:online:{u}"]
    assert phases[2][0].args == ("node-1:1", "u", "b") and result == 1


def test_changes_that_depend_on_an_earlier_removal_start_a_new_group() -> None:
    """A join after a leave that emptied its room, or after its connection's disconnect, waits a group."""
    c = CHANGES
    independent = [c.connect("node-1:1", "u", 0), c.join("r", "node-1:2", "u"), c.leave("s", "node-1:3", True),
                   c.disconnect("node-1:4", "u", ["t"], ["t"])]
    assert [len(g) for g in groups(independent, lambda x: x)] == [4]
    rejoin = [c.leave("r", "node-1:1", True), c.join("r", "node-1:2", "u"), c.join("s", "node-1:2", "u")]
    assert [len(g) for g in groups(rejoin, lambda x: x)] == [1, 2]
    late = [c.disconnect("node-1:1", "u", [], []), c.join("late", "node-1:1", "u")]
    assert [len(g) for g in groups(late, lambda x: x)] == [1, 1]
