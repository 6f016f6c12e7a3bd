"""Which envelope ids this node delivered recently (PROTOCOL.md section 5).

Pure: no I/O, the clock is passed in. A publisher that timed out cannot know
whether its PUBLISH reached Redis; if it sends the same envelope again, this
window lets every node drop the repeat, so "at most once" holds per envelope
id and a retry is safe.

The window is bounded twice: by age (an id is remembered `window` seconds)
and by count (at most `max_ids`, oldest forgotten first), so a flood of
unique ids costs a fixed amount of memory. At the default of 100,000 ids, a
node receiving more than about 1,700 messages per second remembers each id
for less than the full 60 s; retries come within seconds, so that is ample.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RecentIds"]


class RecentIds:
    """A sliding set of ids: `seen(id, now)` is True for a repeat inside the window."""

    __slots__ = ("window", "max_ids", "_ids", "_order")

    def __init__(self, window: float = 60.0, max_ids: int = 100_000) -> None:
        if window < 0 or max_ids < 0:
            raise ValueError("window and max_ids must not be negative")
        self.window = window
        self.max_ids = max_ids
        self._ids: set[str] = set()
        self._order: deque[tuple[float, str]] = deque()

    def seen(self, message_id: str, now: float) -> bool:
        """True if `message_id` was recorded within the window; otherwise record it."""
        if not message_id or not self.max_ids:
            return False  # an id-less envelope (another language's publisher) cannot be deduplicated
        order, ids = self._order, self._ids
        horizon = now - self.window
        while order and order[0][0] <= horizon:
            ids.discard(order.popleft()[1])
        if message_id in ids:
            return True
        if len(order) >= self.max_ids:
            ids.discard(order.popleft()[1])
        ids.add(message_id)
        order.append((now, message_id))
        return False

    def __len__(self) -> int:
        return len(self._ids)
