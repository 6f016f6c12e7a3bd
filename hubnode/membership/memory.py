"""In-process membership for a node running alone (no Redis)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING

from hubnode.membership.base import Member, NodeInfo, Presence, SnapshotSource, Stats, StoreCounters

if TYPE_CHECKING:
    from hubnode.supervisor import Supervisor

__all__ = ["Announce", "MemoryMembershipStore"]

Announce = Callable[[str, str, str], Awaitable[None]]
"""(room, "join" | "leave", user): publish a presence event (the node checks --presence-rooms)."""


class MemoryMembershipStore:
    """A MembershipStore that lives in this process: the single-node default."""

    def __init__(self, node_id: str, *, address: str | None = None, version: str | None = None,
                 announce: Announce | None = None) -> None:
        self.node_id = node_id
        self.address = address
        self.version = version
        self.started_at = time.time()
        self._members: dict[str, dict[str, str | None]] = {}  # room -> conn -> user
        self._clients = 0
        self._online: dict[str, int] = {}
        self._presence: dict[str, dict[str, int]] = {}  # room -> user -> connections in the room
        self.announce = announce
        """The node sets it when none was given (Node does, for the store it is handed)."""

    @property
    def counters(self) -> StoreCounters:
        return StoreCounters()

    @property
    def ready(self) -> bool:
        return True

    async def start(self, snapshot: SnapshotSource, supervisor: Supervisor | None = None) -> None:
        return None

    async def add_connection(self, conn_id: str, user_id: str | None, limit: int = 0) -> bool | None:
        if user_id is not None:
            held = self._online.get(user_id, 0)
            if limit and held >= limit:
                return False
            self._online[user_id] = held + 1
        self._clients += 1
        return True

    async def remove_connection(self, conn_id: str, user_id: str | None, rooms: Sequence[str],
                                emptied: Collection[str] = ()) -> None:
        for room in rooms:
            await self.remove_member(room, conn_id, user_id)
        self._clients = max(0, self._clients - 1)
        if user_id is not None and user_id in self._online:
            self._online[user_id] -= 1
            if self._online[user_id] <= 0:
                del self._online[user_id]

    async def add_member(self, room: str, conn_id: str, user_id: str | None) -> None:
        members = self._members.setdefault(room, {})
        if conn_id in members:
            return
        members[conn_id] = user_id
        if user_id is not None:
            users = self._presence.setdefault(room, {})
            users[user_id] = users.get(user_id, 0) + 1
            if users[user_id] == 1 and self.announce is not None:
                await self.announce(room, "join", user_id)

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        members = self._members.get(room)
        if members is None:
            return
        if conn_id not in members:
            return
        user = members.pop(conn_id)
        if not members:
            del self._members[room]
        users = self._presence.get(room)
        if user is None or users is None or user not in users:
            return
        users[user] -= 1
        if users[user] <= 0:
            del users[user]
            if not users:
                del self._presence[room]
            if self.announce is not None:
                await self.announce(room, "leave", user)

    async def rooms(self) -> dict[str, int]:
        return {room: len(m) for room, m in self._members.items()}

    async def members(self, room: str) -> list[Member]:
        return [Member(c, u, self.node_id) for c, u in self._members.get(room, {}).items()]

    async def presence(self, room: str) -> Presence:
        users = dict(sorted(self._presence.get(room, {}).items()))
        return Presence(room, users, len(self._members.get(room, {})) - sum(users.values()))

    async def stats(self) -> Stats:
        return Stats(clients=self._clients, rooms=len(self._members), nodes=1)

    async def online(self, user_id: str) -> int:
        return self._online.get(user_id, 0)

    async def nodes(self) -> list[NodeInfo]:
        """This node alone: it has no registry entry, so nothing expires."""
        return [NodeInfo(id=self.node_id, clients=self._clients, expires_in=None, started_at=self.started_at,
                         address=self.address, version=self.version)]

    async def heartbeat(self) -> None:
        return None

    def reconcile(self) -> None:
        return None  # nothing is stored elsewhere: nothing can have been lost

    async def close(self) -> None:
        self._members.clear()
        self._presence.clear()
        self._online.clear()
        self._clients = 0
