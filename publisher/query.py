"""Redis conversations written once, run by a sync or an asyncio driver.

A *query* is a generator that yields the Redis commands it needs and receives
their answers, the way websockets' protocol core hands out bytes to send
instead of sending them. It does no I/O and imports neither redis nor
asyncio, so the same function serves `Publisher` (blocking redis-py),
`AsyncPublisher` (redis.asyncio) and `RecordingPublisher` (no Redis at all),
and a test can drive it by hand with canned answers.

A step is either one `Call`, answered with its reply, or a list of calls,
sent as one pipeline (no MULTI) and answered with the list of replies. Calls
name redis-py client methods rather than raw commands, so replies arrive
already parsed (HSCAN as `(cursor, dict)`, ZRANGEBYSCORE WITHSCORES as pairs).

The drivers run on one Redis (`redis.Redis`, `redis.asyncio.Redis`) and on a
Redis Cluster (`redis.RedisCluster`, `redis.asyncio.RedisCluster`) alike. On
a cluster the calls of one list step may name keys of different slots: the
cluster pipeline sends each shard its part (in step order within a shard),
and a script call in it is sent as a raw EVALSHA (redis-py refuses the
`evalsha` method in a cluster pipeline and does not load scripts for one). A
shard that answers NOSCRIPT (a restarted or promoted primary) gets every
script of the step loaded and the whole step is sent once more: every script
call a query sends is safe to repeat (reads, and the history publish, which
answers a repeated envelope id with the first copy's offset).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from inspect import isawaitable
from typing import Any, NamedTuple, Protocol, TypeVar

__all__ = ["Call", "Query", "ScriptCall", "Step", "drive", "drive_async", "is_cluster", "is_pipeline",
           "pipeline_step", "run_step", "text"]

T = TypeVar("T")


class Call(NamedTuple):
    """One redis-py client method call: `getattr(client, name)(*args, **kwargs)`."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def on(self, client: Any) -> Any:
        """Issue this call on a client or a pipeline (returns whatever the method returns)."""
        return getattr(client, self.name)(*self.args, **(self.kwargs or {}))


class _Script(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def sha(self) -> str: ...


class ScriptCall(NamedTuple):
    """One run of a Lua script shipped with the package (EVALSHA, loading it when Redis lacks it).

    On a plain client, redis-py's Script loads the script and retries on
    NOSCRIPT (nothing ran then, so the retry is safe); in a pipeline, the
    pipeline loads every script it carries before it sends the commands, so
    a batch is never half-run because Redis restarted and forgot the script.
    """

    script: _Script
    keys: tuple[str, ...]
    args: tuple[Any, ...]

    def on(self, client: Any) -> Any:
        if is_cluster(client) and is_pipeline(client):  # see the module docstring
            return client.execute_command("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)
        script = client.register_script(self.script.text)
        scripts = getattr(client, "scripts", None)
        if isinstance(scripts, set):  # a pipeline: queue the command, load the script at execute
            scripts.add(script)
            return client.evalsha(script.sha, len(self.keys), *self.keys, *self.args)
        return script(keys=list(self.keys), args=list(self.args))


Step = Call | ScriptCall | list[Call | ScriptCall]
Query = Generator[Step, Any, T]


def drive(query: Query[T], execute: Callable[[Step], Any]) -> T:
    """Run a query to completion with a blocking `execute(step) -> reply`."""
    try:
        step = next(query)
        while True:
            step = query.send(execute(step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def drive_async(query: Query[T], execute: Callable[[Step], Awaitable[Any]]) -> T:
    """Run a query to completion with an awaitable `execute(step) -> reply`."""
    try:
        step = next(query)
        while True:
            step = query.send(await execute(step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def pipeline_step(client: Any, step: list[Call | ScriptCall]) -> Any:
    """Queue a list of calls on a fresh non-transactional pipeline; return the pipeline.

    The caller runs `pipe.execute()` (blocking or awaited): the one line in which
    the sync and async drivers differ.
    """
    pipe = client.pipeline(transaction=False)
    for call in step:
        call.on(pipe)
    return pipe


def run_step(client: Any, step: Step) -> Any:
    """Issue one step on a client: the reply, or an awaitable of it for an asyncio client."""
    if isinstance(step, list):
        if is_cluster(client):
            return _cluster_step(client, step)
        return pipeline_step(client, step).execute()
    return step.on(client)


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client or one of its pipelines (sync or asyncio), without importing redis."""
    return hasattr(client, "nodes_manager")


def is_pipeline(client: Any) -> bool:
    """True for a pipeline (it queues commands until `execute`), of any kind."""
    return callable(getattr(client, "execute", None))


def _cluster_step(client: Any, step: list[Call | ScriptCall]) -> Any:
    """A list step on a Redis Cluster: one pipeline, then (on NOSCRIPT only) the scripts and the step again."""
    replies = pipeline_step(client, step).execute(raise_on_error=False)
    if isawaitable(replies):
        return _cluster_step_async(client, step, replies)
    if not _missing_script(replies):
        return _raised(replies)
    for script in _scripts_of(step):
        client.script_load(script.text)
    return pipeline_step(client, step).execute()


async def _cluster_step_async(client: Any, step: list[Call | ScriptCall], pending: Awaitable[list[Any]]) -> Any:
    replies = await pending
    if not _missing_script(replies):
        return _raised(replies)
    for script in _scripts_of(step):
        await client.script_load(script.text)
    return await pipeline_step(client, step).execute()


def _missing_script(replies: list[Any]) -> bool:
    return any(type(r).__name__ == "NoScriptError" for r in replies)


def _raised(replies: list[Any]) -> list[Any]:
    """The replies, or the first error among them raised (what `execute()` does by default)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _scripts_of(step: list[Call | ScriptCall]) -> list[_Script]:
    seen: dict[str, _Script] = {}
    for call in step:
        if isinstance(call, ScriptCall):
            seen.setdefault(call.script.sha, call.script)
    return list(seen.values())


def text(value: Any) -> str:
    """A reply element as str, whether the client decodes responses or not."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
