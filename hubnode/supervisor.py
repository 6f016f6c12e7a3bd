"""The one owner of a node's long-lived tasks.

A background loop that dies silently is the worst kind of bug: the node keeps
answering `/healthz` while membership writes, heartbeats or the Redis
subscriber have stopped, and everything hangs later. So no component of the
node calls `asyncio.create_task` for a loop of its own; it asks the
supervisor, which guarantees for every task it runs:

- a crash (any exception other than cancellation) is logged at ERROR with its
  traceback and counted per task name (`hubnode_task_crashes_total`);
- while a crashed task is down the node is not ready (`/readyz` 503), so a
  load balancer stops sending it clients;
- the task is started again after a backoff (0.5 s doubling to 5 s, reset
  once it has run for a while), so a transient bug does not take the node out
  for good, and a crash loop cannot spin the CPU.

A task that returns normally is finished (an on-demand flusher with nothing
left to do) and is not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Supervisor", "TaskFactory"]

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

_STABLE = 30.0  # seconds a restarted task must run before its backoff resets


class Supervisor:
    """Runs named tasks; restarts the ones that crash and reports health."""

    def __init__(self, restart_delay: float = 0.5, max_delay: float = 5.0) -> None:
        self.restart_delay = restart_delay
        self.max_delay = max_delay
        self.crashes: Counter[str] = Counter()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._factories: dict[str, TaskFactory] = {}
        self._streak: Counter[str] = Counter()
        self._started: dict[str, float] = {}
        self._restarts: dict[str, asyncio.TimerHandle] = {}
        self._down: set[str] = set()
        self._closed = False

    @property
    def healthy(self) -> bool:
        """False while a crashed task waits to be restarted."""
        return not self._down

    @property
    def down(self) -> frozenset[str]:
        return frozenset(self._down)

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def spawn(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` as task `name` unless that task is already running."""
        if self._closed or self.running(name):
            return
        self._factories[name] = factory
        loop = asyncio.get_running_loop()
        task = loop.create_task(factory(), name=f"hubnode-{name}")
        self._tasks[name] = task
        self._started[name] = loop.time()
        self._down.discard(name)
        task.add_done_callback(lambda t: self._on_done(name, t))

    async def stop(self, name: str, timeout: float = 5.0) -> None:
        """Cancel task `name` (no restart) and wait, bounded, for it to end."""
        self._factories.pop(name, None)
        handle = self._restarts.pop(name, None)
        if handle is not None:
            handle.cancel()
        self._down.discard(name)
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.wait([task])

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every task; nothing is restarted afterwards."""
        self._closed = True
        for name in list(self._tasks) + list(self._restarts):
            await self.stop(name, timeout)

    def _on_done(self, name: str, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if self._tasks.get(name) is not task:
            # a stale callback: the name was spawned again after this task ended
            # (the new task owns the name, its factory and its health)
            if exc is not None:
                self.crashes[name] += 1
                log.error("task %s crashed", name, exc_info=exc)
            return
        del self._tasks[name]
        if task.cancelled() or self._closed or name not in self._factories:
            return
        if exc is None:
            self._factories.pop(name, None)  # finished its work: nothing to restart
            return
        loop = asyncio.get_running_loop()
        self.crashes[name] += 1
        if loop.time() - self._started.get(name, 0.0) > _STABLE:
            self._streak[name] = 0
        delay = min(self.max_delay, self.restart_delay * 2 ** self._streak[name])
        self._streak[name] += 1
        self._down.add(name)
        log.error("task %s crashed; restarting in %.1fs", name, delay, exc_info=exc)
        self._restarts[name] = loop.call_later(delay, self._restart, name)

    def _restart(self, name: str) -> None:
        self._restarts.pop(name, None)
        factory = self._factories.get(name)
        if factory is not None and not self._closed:
            self.spawn(name, factory)
