"""Which envelope ids this node delivered recently (docs/protocol.md).

Pure: no I/O, the clock is passed in. A publisher that timed out cannot know
whether its PUBLISH reached Redis; if it sends the same envelope again, this
window lets every node drop the repeat, so "at most once" holds per envelope
id and a retry is safe.

Two generations of plain sets, rotated every `window` seconds: an id is
remembered at least `window` seconds (and at most two windows), and a lookup
is two set probes, with no per-id timestamp or queue entry: the cheapest
structure that keeps the promise on the delivery path. The count is bounded
too: a generation rotates early once it holds `max_ids / 2` ids, so a flood of
unique ids costs a fixed amount of memory (about 10 MB at the default), at
the price of remembering ids for less than the window during the flood.
Retries come within seconds, so that is ample.
"""

from __future__ import annotations

__all__ = ["RecentIds"]


class RecentIds:
    """A sliding set of ids: `seen(id, now)` is True for a repeat inside the window."""

    __slots__ = ("window", "max_ids", "_current", "_previous", "_since")

    def __init__(self, window: float = 60.0, max_ids: int = 100_000) -> None:
        if window < 0 or max_ids < 0:
            raise ValueError("window and max_ids must not be negative")
        self.window = window
        self.max_ids = max_ids
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self._since: float | None = None  # when the current generation began

    def seen(self, message_id: str, now: float) -> bool:
        """True if `message_id` was recorded within the window; otherwise record it."""
        if not message_id or not self.max_ids or not self.window:
            return False  # off, or an id-less envelope (another language's publisher): nothing to compare
        if self._since is None:
            self._since = now
        elif now - self._since >= self.window or len(self._current) >= max(1, self.max_ids // 2):
            # ids of the current generation were all recorded before since + window
            self._previous = self._current if now - self._since < 2 * self.window else set()
            self._current = set()
            self._since = now
        if message_id in self._current or message_id in self._previous:
            return True
        self._current.add(message_id)
        return False

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
