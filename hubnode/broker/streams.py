"""Stream history in memory: what lua/publish.lua and lua/read.lua do, for the embedded broker.

A single node without Redis recovers its clients too (docs/protocol.md,
history and recovery): the same offsets, epochs, window and expiry, in a dict. Pure: the clock
is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from publisher.history import StreamRead, StreamRef, new_epoch, splice

__all__ = ["MemoryStreams"]


@dataclass(slots=True)
class _Stream:
    epoch: str
    size: int
    ttl: int
    expires: float
    offset: int = 0
    entries: deque[bytes] = field(default_factory=deque)
    ids: dict[str, int] = field(default_factory=dict)  # envelope id -> offset, for the messages kept


class MemoryStreams:
    """Every stream of one embedded broker, keyed by the stream's key name."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._ops = 0

    def __len__(self) -> int:
        return len(self._streams)

    def _get(self, key: str, now: float) -> _Stream | None:
        stream = self._streams.get(key)
        if stream is not None and stream.expires <= now:
            del self._streams[key]  # expired: the next one gets a new epoch
            return None
        return stream

    def append(self, ref: StreamRef, payload: bytes, envelope_id: str, size: int, ttl: int,
               now: float) -> bytes | None:
        """The payload to publish, with its position; None when the stream has no history (publish as is)."""
        stream = self._get(ref.stream, now)
        if stream is None:
            if size <= 0:
                return None
            stream = self._streams[ref.stream] = _Stream(new_epoch(), size, ttl, now + ttl)
        elif envelope_id and envelope_id in stream.ids:
            return b""  # a retry of a message the stream keeps: stored and delivered already
        elif size > 0:
            stream.size, stream.ttl = size, ttl
        stream.offset += 1
        body = splice(payload, stream.offset, stream.epoch)
        stream.entries.append(body)
        while len(stream.entries) > stream.size:
            stream.entries.popleft()
        if envelope_id:
            stream.ids[envelope_id] = stream.offset
            low = stream.offset - stream.size
            while stream.ids:  # dicts keep insertion order: the oldest ids come first
                oldest = next(iter(stream.ids))
                if stream.ids[oldest] > low:
                    break
                del stream.ids[oldest]
        stream.expires = now + stream.ttl
        self._sweep(now)
        return body

    def _sweep(self, now: float) -> None:
        """Drop expired streams now and then (amortised): a stream nobody touches again must not stay."""
        self._ops += 1
        if self._ops % 1024 == 0:
            for key in [k for k, s in self._streams.items() if s.expires <= now]:
                del self._streams[key]

    def read(self, ref: StreamRef, since: int, limit: int, create: tuple[int, int] | None,
             now: float) -> StreamRead:
        """As lua/read.lua: the position, and the entries above `since` (-1: none)."""
        stream = self._get(ref.stream, now)
        if stream is None:
            if create is None:
                return StreamRead(None, 0, 0)
            size, ttl = create
            self._streams[ref.stream] = _Stream(new_epoch(), size, ttl, now + ttl)
            return StreamRead(self._streams[ref.stream].epoch, 0, 0)
        kept = len(stream.entries)
        payloads: tuple[bytes, ...] = ()
        if 0 <= since < stream.offset:
            first = stream.offset - kept + 1  # the offset of entries[0]
            start = max(0, since + 1 - first)
            stop = kept if limit <= 0 else min(kept, start + limit)
            payloads = tuple(islice(stream.entries, start, stop))
        return StreamRead(stream.epoch, stream.offset, kept, payloads)
