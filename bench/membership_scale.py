"""How long one membership script blocks Redis when nodes and rooms are large.

Redis runs a Lua script to completion before it serves any other command, so
the longest single script the membership store sends is a stall of the whole
hub: every publish, join and heartbeat of every node waits behind it. This
script measures that stall, with Redis' own slowlog, for the operations whose
cost grows with a node's or a room's size: sweeping a dead node, draining a
node (close), registering one and re-registering one after its entry was lost.

It uses only the public API of `RedisMembershipStore` (constructor, start,
heartbeat, sweep, close), so the same script measures the store before and
after a rewrite of hubnode/membership/:

    .venv/bin/python -m bench.membership_scale                     # the sizes below, ~20 s
    .venv/bin/python -m bench.membership_scale --members 10000 --rooms-spec 100x100
    .venv/bin/python -m bench.membership_scale --only a,c --json out.json

To measure another revision, run this file from an export of it:
`git archive REV | tar -x -C DIR`, copy this file to DIR/bench/ and run the
command above from DIR (the current directory comes first on sys.path).

Scenarios (N = --members, R x M = --rooms-spec, K = --few):
  a  sweep of node A holding one room of N members (users u0..uN-1)
  b  sweep of node A holding R*M members spread as R rooms of M members
  c  sweep of node A holding K members of a room of N whose other N-K are on node C
  d  registration: start() with N connections in one room
  e  re-registration: after d, A's entry in <prefix>nodes is deleted, heartbeat() re-registers
  f  drain: close() of the node of d/e (N members in one room)
In a-c the sweeper is node B, alive with no connections, calling sweep(now)
with now an hour ahead of the clock: A was registered with a 0.001 s heartbeat
(expiry 3 ms after registering) and C with a 30 h one, so only A has expired.

A private redis-server (no persistence) is started on a free loopback port
with `slowlog-log-slower-than 0` (--slowlog-threshold-us), so every command is
logged with its execution time. For each scenario the slowlog is reset, the
operation run and the slowlog read: the longest script call (EVAL/EVALSHA/
FCALL) is the stall. Script calls and their total time are read from INFO
commandstats around the operation (with threshold 0 they equal the
slowlog's; a note is printed if not). Redis 7 also logs each command a script
runs (from Lua's client, address "?:0"): those are counted apart, "cmds in
scripts", with the slowest of them; logging them is not free, so with
threshold 0 the script times include the slowlog's own cost per command
(measured at 10-40% here); a threshold of e.g. 10000 leaves it out. "other
cmds" are the commands the store sent itself (single-slot steps such as the
HSETs of a registration). Scripts are loaded before the first scenario, and
again by the store at the start of each (re-)registration, so no measured
call is a NOSCRIPT miss.

After each scenario the end state is checked exactly against the expected
membership (every members hash, every user's online hash, the node registry,
the live nodes' own keys and indexes, and no key at all naming a removed
node) and a FAIL line is printed for each difference; the exit status is
then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from bench.procs import RedisServer
from hubnode.membership.redis import RedisMembershipStore
from publisher.keys import Keys

T = TypeVar("T")
Conn = tuple[str, str | None, frozenset[str]]

PREFIX = "msb:"
NODE_A, NODE_B, NODE_C = "bench-a", "bench-b", "bench-c"
SCENARIOS = "abcdef"
SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
CLIENT_NAME = "membership-scale"  # every connection of this script; commands run by scripts have no name
TINY_HEARTBEAT = 0.001  # expiry = now + 3 ms: the node is dead for any later sweep
LONG_HEARTBEAT = 36_000.0  # expiry 30 h ahead: never swept by the far-future sweep below
FUTURE_MS = 3_600_000  # sweeps run with now = wall clock + 1 h


@dataclass
class Result:
    """One measured operation."""

    scenario: str
    operation: str
    logged_calls: int = 0  # script calls in the slowlog
    script_max_ms: float = 0.0
    logged_total_ms: float = 0.0
    in_script: int = 0
    in_script_max_ms: float = 0.0
    in_script_max_command: str = ""
    other_calls: int = 0
    other_max_ms: float = 0.0
    other_max_command: str = ""
    script_loads: int = 0
    stats_calls: int = 0  # script calls and their total time per INFO commandstats
    stats_total_ms: float = 0.0
    wall_ms: float = 0.0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sizes:
    members: int
    rooms: int
    per_room: int
    few: int


# -- building blocks ---------------------------------------------------------------


def connections(node: str, count: int, room_of: Callable[[int], str], first_user: int = 0) -> list[Conn]:
    """`count` connections f"{node}:{i}", user u<first_user + i>, each in the one room room_of(i)."""
    return [(f"{node}:{i}", f"u{first_user + i}", frozenset({room_of(i)})) for i in range(count)]


def new_store(url: str, node: str, heartbeat: float) -> RedisMembershipStore:
    client = aioredis.Redis.from_url(url, client_name=CLIENT_NAME)
    return RedisMembershipStore(client, Keys(PREFIX), node, heartbeat=heartbeat)


async def started(url: str, node: str, conns: list[Conn], heartbeat: float) -> RedisMembershipStore:
    store = new_store(url, node, heartbeat)
    await store.start(lambda: conns)
    return store


def far_future_ms() -> int:
    return int(time.time() * 1000) + FUTURE_MS


async def script_stats(admin: aioredis.Redis) -> tuple[int, int]:
    """(calls, microseconds) of every script command so far, from INFO commandstats."""
    stats: dict[str, dict[str, Any]] = await admin.info("commandstats")
    names = {f"cmdstat_{name.lower()}" for name in SCRIPT_COMMANDS}
    chosen = [v for k, v in stats.items() if k in names]
    return sum(int(v["calls"]) for v in chosen), sum(int(v["usec"]) for v in chosen)


async def measure(admin: aioredis.Redis, result: Result, op: Callable[[], Awaitable[T]]) -> T:
    """Run `op` between a SLOWLOG RESET and a SLOWLOG GET; fill `result` from the entries.

    The script calls and their total also come from INFO commandstats, which does not depend on the
    slowlog's threshold or length: with --slowlog-threshold-us 0 both must agree."""
    calls_before, usec_before = await script_stats(admin)
    await admin.slowlog_reset()
    t0 = time.perf_counter()
    value = await op()
    result.wall_ms = (time.perf_counter() - t0) * 1000
    entries: list[dict[str, Any]] = await admin.slowlog_get(-1)
    calls_after, usec_after = await script_stats(admin)
    result.stats_calls = calls_after - calls_before
    result.stats_total_ms = (usec_after - usec_before) / 1000
    for entry in entries:
        words = _text(entry["command"]).split(maxsplit=2)
        name = words[0].upper() if words else ""
        ms = int(entry["duration"]) / 1000
        if _text(entry.get("client_name", "")) != CLIENT_NAME or _text(entry.get("client_address", "")) == "?:0":
            result.in_script += 1  # run by a script (Lua's client): its time is part of the script's
            if ms >= result.in_script_max_ms:
                result.in_script_max_ms = ms
                result.in_script_max_command = " ".join(words[:2])[:40] + (" …" if len(words) > 2 else "")
        elif name in SCRIPT_COMMANDS:
            result.logged_calls += 1
            result.logged_total_ms += ms
            result.script_max_ms = max(result.script_max_ms, ms)
        elif name != "SLOWLOG":
            result.other_calls += 1
            if name == "SCRIPT" and len(words) > 1 and words[1].upper() == "LOAD":
                result.script_loads += 1
            if ms >= result.other_max_ms:
                result.other_max_ms = ms
                result.other_max_command = " ".join(words[:2])[:40] + (" …" if len(words) > 2 else "")
    return value


async def reset(admin: aioredis.Redis, stores: Iterable[RedisMembershipStore]) -> None:
    """Empty Redis first (so the closes below have nothing to drain), then close the stores."""
    await admin.flushall()
    for store in stores:
        await store.close()


# -- the exact end state -----------------------------------------------------------------


def _glob(s: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in s)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Iterable[Any]) -> set[str]:
    return {_text(v) for v in values}


async def _hash(r: aioredis.Redis, key: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (await r.hgetall(key)).items()}


async def _names(r: aioredis.Redis, key: str) -> set[str] | None:
    """The member names of a set, hash or sorted set (empty if missing); None for another type."""
    kind = _text(await r.type(key))
    if kind == "set":
        return _texts(await r.smembers(key))
    if kind == "hash":
        return _texts(await r.hkeys(key))
    if kind == "zset":
        return _texts(await r.zrange(key, 0, -1))
    if kind == "none":
        return set()
    return None


def _diff(what: str, have: dict[str, str], want: dict[str, str], gone: Sequence[str] = ()) -> list[str]:
    """One line describing how hash `have` differs from `want` (none if equal); with `gone`, how many
    extra fields are connections of removed nodes (conn ids are f"{node}:{n}")."""
    if have == want:
        return []
    extra = have.keys() - want.keys()
    missing = want.keys() - have.keys()
    wrong = sum(1 for k in have.keys() & want.keys() if have[k] != want[k])
    of_gone = f" ({sum(1 for k in extra if k.split(':')[0] in gone)} of removed nodes)" if gone else ""
    return [f"{what}: {len(extra)} extra{of_gone}, {len(missing)} missing, {wrong} wrong values"]


async def verify(r: aioredis.Redis, live: dict[str, list[Conn]], gone: Sequence[str]) -> list[str]:
    """Differences between Redis and the membership of exactly the `live` nodes' connections."""
    keys = Keys(PREFIX)
    problems: list[str] = []
    want_members: dict[str, dict[str, str]] = {}
    want_online: Counter[str] = Counter()
    for conns in live.values():
        for conn, user, rooms in conns:
            if user:
                want_online[user] += 1
            for room in rooms:
                want_members.setdefault(room, {})[conn] = user or ""

    nodes = _texts(await r.zrange(keys.nodes, 0, -1))
    if nodes != set(live):
        problems.append(f"{keys.nodes} holds {sorted(nodes)}, expected {sorted(live)}")

    head, tail = keys.members("\0").split("\0")
    have_len: dict[str, int] = {}
    async for raw in r.scan_iter(match=_glob(head) + "*", count=1000):
        key = _text(raw)
        room = key[len(head):len(key) - len(tail)]
        have = await _hash(r, key)
        have_len[room] = len(have)
        problems += _diff(key, have, want_members.get(room, {}), gone)
    for room in want_members.keys() - have_len.keys():
        problems.append(f"{keys.members(room)} is missing ({len(want_members[room])} members expected)")

    head, tail = keys.online("\0").split("\0")
    online: dict[str, str] = {}
    async for raw in r.scan_iter(match=_glob(head) + "*", count=1000):
        key = _text(raw)
        user = key[len(head):len(key) - len(tail)]
        entries = await _hash(r, key)
        online[user] = str(len(entries))
        wrong = [conn for conn, node in entries.items() if not conn.startswith(f"{node}:")]
        if wrong:
            problems.append(f"{key}: {len(wrong)} connections recorded under another node (e.g. {wrong[:3]})")
    problems += _diff(f"{head}*{tail} (connections per user)", online,
                      {u: str(n) for u, n in want_online.items()})

    for node in gone:
        left = [_text(k) async for k in r.scan_iter(match=f"*{_glob(node)}*", count=1000)]
        if left:
            problems.append(f"removed node {node} still has keys: {sorted(left)[:5]}")

    for node, conns in live.items():
        raw_clients = await r.hget(keys.node(node), "clients")
        clients = None if raw_clients is None else _text(raw_clients)
        if clients is None or int(clients) != len(conns):
            problems.append(f"{keys.node(node)} clients={clients}, expected {len(conns)}")
        want_conns = {conn for conn, _, _ in conns}
        want_rooms = {room for _, _, rooms in conns for room in rooms}
        for key, want in ((keys.node_conns(node), want_conns), (keys.node_rooms(node), want_rooms)):
            have_names = await _names(r, key)
            if have_names is None:
                problems.append(f"{key} is a {_text(await r.type(key))}, expected a set")
            elif have_names != want:
                problems.append(f"{key}: {len(have_names - want)} extra, {len(want - have_names)} missing")
        users = Counter(user for _, user, _ in conns if user)
        have_users = await _hash(r, keys.node_users(node))
        problems += _diff(keys.node_users(node), have_users, {u: str(n) for u, n in users.items()})
    return problems


# -- scenarios ------------------------------------------------------------------------------


async def sweep_scenario(url: str, admin: aioredis.Redis, result: Result,
                         a_conns: list[Conn], c_conns: list[Conn] | None = None) -> Result:
    """Node A (dead) holds `a_conns`, node C (alive) `c_conns`; live node B sweeps."""
    stores: list[RedisMembershipStore] = []
    live: dict[str, list[Conn]] = {NODE_B: []}
    try:
        stores.append(await started(url, NODE_A, a_conns, TINY_HEARTBEAT))
        if c_conns is not None:
            stores.append(await started(url, NODE_C, c_conns, LONG_HEARTBEAT))
            live[NODE_C] = c_conns
        sweeper = await started(url, NODE_B, [], LONG_HEARTBEAT)
        stores.append(sweeper)
        now = far_future_ms()
        swept = await measure(admin, result, lambda: sweeper.sweep(now))
        if swept != [NODE_A]:
            result.problems.append(f"sweep returned {swept}, expected [{NODE_A!r}]")
        result.problems += await verify(admin, live, [NODE_A])
    finally:
        await reset(admin, stores)
    return result


async def lifecycle(url: str, admin: aioredis.Redis, conns: list[Conn], wanted: str) -> list[Result]:
    """d: register, e: re-register after the registry entry is lost, f: drain; unwanted steps run
    unmeasured only when a later wanted step needs them."""
    results: list[Result] = []
    store = new_store(url, NODE_A, 2.0)
    started_, closed = False, False
    try:
        d = Result("d", f"register {len(conns):,} conns in 1 room (start)")
        if "d" in wanted:
            await measure(admin, d, lambda: store.start(lambda: conns))
            started_ = True
            d.problems += await verify(admin, {NODE_A: conns}, [])
            results.append(d)
        else:
            await store.start(lambda: conns)
            started_ = True
        if "e" in wanted:
            e = Result("e", f"re-register {len(conns):,} conns after ZREM nodes (heartbeat)")
            await admin.zrem(Keys(PREFIX).nodes, NODE_A)
            lost_at = time.time() * 1000
            await measure(admin, e, store.heartbeat)
            expiry = await admin.zscore(Keys(PREFIX).nodes, NODE_A)
            if expiry is None or expiry <= lost_at:
                e.problems.append(f"{NODE_A} expiry after re-registration is {expiry}, "
                                  f"not after the entry was deleted ({lost_at:.0f})")
            e.problems += await verify(admin, {NODE_A: conns}, [])
            results.append(e)
        if "f" in wanted:
            f = Result("f", f"drain {len(conns):,} conns in 1 room (close)")
            closed = True
            await measure(admin, f, store.close)
            f.problems += await verify(admin, {}, [NODE_A])
            results.append(f)
    finally:
        await admin.flushall()
        if started_ and not closed:
            await store.close()  # nothing left to drain: only ends the writer and the client
    return results


async def warm_up(url: str, admin: aioredis.Redis) -> None:
    """Load every script the scenarios use into Redis' script cache, so that no measured call is a
    NOSCRIPT miss followed by SCRIPT LOAD: a sweep, a drain and a re-registration of nodes with members."""
    dead = await started(url, NODE_A, connections(NODE_A, 3, lambda i: f"warm{i % 2}"), TINY_HEARTBEAT)
    drained = await started(url, NODE_C, connections(NODE_C, 3, lambda i: f"warm{i % 2}"), LONG_HEARTBEAT)
    sweeper = await started(url, NODE_B, connections(NODE_B, 3, lambda i: f"warm{i % 2}"), LONG_HEARTBEAT)
    await sweeper.sweep(far_future_ms())
    await drained.close()
    await admin.zrem(Keys(PREFIX).nodes, NODE_B)
    await sweeper.heartbeat()
    await reset(admin, [dead, sweeper])


async def run(sizes: Sizes, wanted: str, threshold_us: int) -> list[Result]:
    # a re-registration of N members logs ~7 commands per member (its purge and its register)
    max_len = max(1_000_000, 10 * max(sizes.members, sizes.rooms * sizes.per_room))
    log_dir = Path(tempfile.mkdtemp(prefix="membership-scale-"))
    server = RedisServer(log_dir)
    try:
        admin = aioredis.Redis.from_url(server.url, decode_responses=True, client_name=CLIENT_NAME)
        try:
            await admin.config_set("slowlog-log-slower-than", threshold_us)
            await admin.config_set("slowlog-max-len", max_len)
            info = await admin.info("server")
            print(f"redis-server {info['redis_version']} on {server.url} (pid {server.pid}, logs {log_dir})",
                  file=sys.stderr)
            await warm_up(server.url, admin)
            n, few = sizes.members, sizes.few
            results: list[Result] = []
            if "a" in wanted:
                results.append(await sweep_scenario(
                    server.url, admin, Result("a", f"sweep A: 1 room x {n:,} (all on A)"),
                    connections(NODE_A, n, lambda _i: "big")))
                report_progress(results[-1])
            if "b" in wanted:
                m = sizes.per_room
                results.append(await sweep_scenario(
                    server.url, admin,
                    Result("b", f"sweep A: {sizes.rooms:,} rooms x {m:,} (all on A)"),
                    connections(NODE_A, sizes.rooms * m, lambda i: f"r{i // m}")))
                report_progress(results[-1])
            if "c" in wanted:
                results.append(await sweep_scenario(
                    server.url, admin, Result("c", f"sweep A: 1 room x {n:,}, {few:,} on A, rest on C"),
                    connections(NODE_A, few, lambda _i: "big"),
                    connections(NODE_C, n - few, lambda _i: "big", first_user=few)))
                report_progress(results[-1])
            if any(s in wanted for s in "def"):
                for result in await lifecycle(server.url, admin, connections(NODE_A, n, lambda _i: "big"), wanted):
                    results.append(result)
                    report_progress(result)
            return results
        finally:
            await admin.aclose()
    finally:
        server.stop()


# -- output ---------------------------------------------------------------------------------


def report_progress(result: Result) -> None:
    print(f"  {result.scenario}: {result.operation}: max script {result.script_max_ms:.1f} ms, "
          f"wall {result.wall_ms:.0f} ms{'' if not result.problems else ', FAILED'}", file=sys.stderr)


def table(results: Sequence[Result]) -> str:
    rows = ["| scenario | operation | script calls | max script ms | total script ms | cmds in scripts "
            "| max cmd in scripts ms (cmd) | other cmds | max other ms (cmd) | wall ms | state |",
            "|---|---|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for r in results:
        state = "ok" if not r.problems else f"FAIL ({len(r.problems)})"
        other = f"{r.other_max_ms:.2f} ({r.other_max_command})" if r.other_calls else "-"
        inner = f"{r.in_script_max_ms:.2f} ({r.in_script_max_command})" if r.in_script else "-"
        rows.append(f"| {r.scenario} | {r.operation} | {r.stats_calls} | {r.script_max_ms:.1f} "
                    f"| {r.stats_total_ms:.1f} | {r.in_script} | {inner} | {r.other_calls} | {other} "
                    f"| {r.wall_ms:.0f} | {state} |")
    return "\n".join(rows)


def positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def rooms_spec(value: str) -> tuple[int, int]:
    rooms, sep, per_room = value.lower().partition("x")
    try:
        spec = (positive(rooms), positive(per_room))
    except (ValueError, argparse.ArgumentTypeError):
        spec = None
    if not sep or spec is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not ROOMSxMEMBERS, e.g. 1000x100")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.membership_scale",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=positive, default=100_000,
                        help="N: members of the big room in a, c, d, e, f (default 100000)")
    parser.add_argument("--rooms-spec", type=rooms_spec, default=(1000, 100), metavar="RxM",
                        help="scenario b: R rooms of M members (default 1000x100)")
    parser.add_argument("--few", type=positive, default=100,
                        help="K: node A's share of the big room in scenario c (default 100)")
    parser.add_argument("--only", default=SCENARIOS, help="scenarios to run, e.g. a,c (default all)")
    parser.add_argument("--slowlog-threshold-us", type=int, default=0, metavar="US",
                        help="slowlog-log-slower-than (default 0: every command, including each command a "
                             "script runs, which adds the slowlog's own cost to the scripts; a higher value "
                             "logs only scripts slower than that, and counts and totals come from "
                             "INFO commandstats)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    wanted = "".join(c for c in args.only.lower() if c in SCENARIOS)
    if not wanted:
        parser.error(f"--only: no scenario among {', '.join(SCENARIOS)}")
    if args.few >= args.members:
        parser.error("--few must be smaller than --members")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = Sizes(args.members, args.rooms_spec[0], args.rooms_spec[1], args.few)

    t0 = time.perf_counter()
    results = asyncio.run(run(sizes, wanted, args.slowlog_threshold_us))
    print(f"membership scale: {sizes}, run took {time.perf_counter() - t0:.0f} s\n")
    print(table(results))
    failed = [(r.scenario, p) for r in results for p in r.problems]
    for scenario, problem in failed:
        print(f"FAIL {scenario}: {problem}")
    if args.slowlog_threshold_us <= 0:
        for r in results:
            if r.logged_calls != r.stats_calls or abs(r.logged_total_ms - r.stats_total_ms) > 0.01 * r.stats_total_ms:
                print(f"note: {r.scenario}: slowlog has {r.logged_calls} script calls ({r.logged_total_ms:.1f} ms), "
                      f"commandstats {r.stats_calls} ({r.stats_total_ms:.1f} ms)")
    else:
        print(f"note: slowlog-log-slower-than {args.slowlog_threshold_us} us: 'cmds in scripts' and 'other cmds' "
              "count only the commands at least that slow; a max of 0.0 means no script was")
    # the store loads every script at the start of each (re-)registration (d, e), never after a miss there
    loads = [r.scenario for r in results if r.script_loads and r.scenario not in "de"]
    if loads:
        print(f"note: SCRIPT LOAD ran during {loads}: their script calls may include NOSCRIPT misses")
    if args.json:
        args.json.write_text(json.dumps({"sizes": asdict(sizes), "results": [asdict(r) for r in results]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
