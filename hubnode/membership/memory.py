"""In-process membership for a node running alone (no Redis)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from hubnode.membership.base import Member, SnapshotSource, Stats

__all__ = ["MemoryMembershipStore"]


class MemoryMembershipStore:
    """A MembershipStore that lives in this process: the single-node default."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._members: dict[str, dict[str, str | None]] = {}  # room -> conn -> user
        self._clients = 0
        self._online: dict[str, int] = {}

    async def start(self, snapshot: SnapshotSource) -> None:
        return None

    async def add_connection(self, conn_id: str, user_id: str | None) -> None:
        self._clients += 1
        if user_id is not None:
            self._online[user_id] = self._online.get(user_id, 0) + 1

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
        self._members.setdefault(room, {})[conn_id] = user_id

    async def remove_member(self, room: str, conn_id: str, user_id: str | None,
                            emptied: bool = False) -> None:
        members = self._members.get(room)
        if members is None:
            return
        members.pop(conn_id, None)
        if not members:
            del self._members[room]

    async def rooms(self) -> dict[str, int]:
        return {room: len(m) for room, m in self._members.items()}

    async def members(self, room: str) -> list[Member]:
        return [Member(c, u, self.node_id) for c, u in self._members.get(room, {}).items()]

    async def stats(self) -> Stats:
        return Stats(clients=self._clients, rooms=len(self._members), nodes=1)

    async def online(self, user_id: str) -> int:
        return self._online.get(user_id, 0)

    async def heartbeat(self) -> None:
        return None

    async def close(self) -> None:
        self._members.clear()
        self._online.clear()
        self._clients = 0
