"""Membership stores: who is in which room, cluster-wide."""

from hubnode.membership.base import Member, MembershipStore, Snapshot, Stats
from hubnode.membership.memory import MemoryMembershipStore

__all__ = ["Member", "MembershipStore", "MemoryMembershipStore", "Snapshot", "Stats"]
