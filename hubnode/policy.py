"""Per-connection limits: rate-limit arithmetic and the error streak.

Pure: time is passed in, so tests drive the clock with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from publisher.names import matches_any

__all__ = ["ErrorStreak", "TokenBucket", "origin_allowed", "room_allowed"]


@dataclass(slots=True)
class TokenBucket:
    """`burst` tokens refilled at `rate` per second; rate 0 means unlimited."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        """Spend one token at time `now`; False when none is left."""
        if self.rate <= 0:
            return True
        if self.tokens < 0:  # first use: start full
            self.tokens, self.stamp = self.burst, now
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class ErrorStreak:
    """Counts errors in a row; a success resets it. Over `limit` means close 1008."""

    limit: int = 10
    count: int = 0

    def error(self) -> bool:
        """Record an error; True when the streak has passed the limit."""
        self.count += 1
        return self.count > self.limit

    def ok(self) -> None:
        self.count = 0


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | None, local_default: bool) -> bool:
    """docs/protocol.md: no Origin (not a browser) passes; `*` allows all.

    `allowed` None means "not configured": then only localhost origins pass,
    and only when `local_default` (auth none on loopback) holds.
    """
    if origin is None:
        return True
    if allowed is not None:
        return "*" in allowed or origin in allowed
    if not local_default:
        return False
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return False
    host = rest.rsplit(":", 1)[0] if not rest.endswith("]") else rest
    return host in _LOCAL_HOSTS


def room_allowed(patterns: tuple[str, ...] | None, room: str) -> bool:
    """The JWT `rooms` claim: exact names and `prefix*` patterns; None allows every room."""
    return patterns is None or matches_any(patterns, room)
