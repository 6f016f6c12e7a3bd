"""The `MembershipStore` interface (after centrifuge's PresenceManager).

A store records which connection is in which room and how many connections
each user has, for every node of the hub, so that any node (or `hubctl`) can
answer "who is in room R" without asking the others. Writes come from the
node that owns the connection; reads may be served by any node.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from publisher.inspect import HubStats, Member, NodeInfo, Presence

if TYPE_CHECKING:
    from hubnode.supervisor import Supervisor

__all__ = ["Member", "MembershipStore", "NodeInfo", "Presence", "Snapshot", "SnapshotSource", "Stats", "StoreCounters"]


Stats = HubStats
"""clients, rooms, nodes: the numbers of `GET /api/stats` (one type with hubctl's)."""

Snapshot = Iterable[tuple[str, str | None, frozenset[str]]]
"""(conn_id, user_id, rooms) of every local connection, for re-registration."""

SnapshotSource = Callable[[], Snapshot]


@dataclass(frozen=True, slots=True)
class StoreCounters:
    """What a store counts, for /metrics (all zero for the memory store)."""

    failed_updates: int = 0
    swept_nodes: int = 0
    registrations: int = 0


class MembershipStore(Protocol):
    """Cluster membership; a memory and a Redis implementation exist."""

    @property
    def counters(self) -> StoreCounters:
        ...

    @property
    def ready(self) -> bool:
        """True while this node is registered, so connection counts and limits can be checked."""
        ...

    async def start(self, snapshot: SnapshotSource, supervisor: Supervisor | None = None) -> None:
        """Register this node (before it accepts connections).

        `snapshot()` lists the node's local connections; the store calls it
        whenever it must re-register them (its entry was swept, Redis lost its
        data, or an update failed and must be reconciled). Long-lived tasks
        run under `supervisor`.
        """
        ...

    async def add_connection(self, conn_id: str, user_id: str | None, limit: int = 0) -> bool | None:
        """Count a new connection (node clients, user online count).

        With `limit`, the user's connections cluster-wide are checked and
        counted in one atomic step: False (and nothing counted) when the user
        already holds `limit`, so concurrent handshakes cannot all pass.
        None when the store could not answer (the node reconciles the count
        later, but the limit was not checked).
        """
        ...

    async def remove_connection(self, conn_id: str, user_id: str | None, rooms: Sequence[str],
                                emptied: Collection[str] = ()) -> None:
        """Forget a closed connection and its memberships in one atomic change.

        `emptied`: rooms in which this node has no local member left.
        """
        ...

    async def add_member(self, room: str, conn_id: str, user_id: str | None) -> None:
        """Record that `conn_id` joined `room` (call once per real join)."""
        ...

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        """Record that `conn_id` left `room` (`emptied`: no local member left in it)."""
        ...

    async def rooms(self) -> dict[str, int]:
        """Room -> member count, cluster-wide."""
        ...

    async def members(self, room: str) -> list[Member]:
        ...

    async def stats(self) -> Stats:
        ...

    async def online(self, user_id: str) -> int:
        """Connections the user has, cluster-wide."""
        ...

    async def presence(self, room: str) -> Presence:
        """Who is in `room`: users with their connection counts, and anonymous connections, cluster-wide.

        A store also announces presence (docs/protocol.md): the change
        that adds a user's first member of a room announced by the node's
        --presence-rooms, or removes the last, publishes the `join` or
        `leave` in the same step, so each transition is announced exactly
        once, whichever node (or sweeper) made it.
        """
        ...

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes (this one alone for a store without a registry)."""
        ...

    async def heartbeat(self) -> None:
        """Renew this node's liveness, sweep dead nodes, re-register if swept."""
        ...

    def reconcile(self) -> None:
        """Rewrite this node's entries from its own table soon (at the next heartbeat).

        Called after the node lost its subscription: a Redis failover may have
        lost membership writes the old primary had not yet replicated.
        """
        ...

    async def close(self) -> None:
        """Remove this node's own entries (drain) and release connections."""
        ...
