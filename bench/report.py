"""Results: the JSON of a run, its Markdown report and an optional PNG.

The Markdown opens with the targets of the issue and the ratios
python-socketio / hubnode and Node.js Socket.IO / hubnode from the same run,
then what history costs (hubnode with history on / off), then one table per
scenario with every figure, then how the numbers were taken.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import ROOT, nofile_limit

__all__ = ["environment", "plot", "plot_scaling", "write_markdown"]

Row = dict[str, Any]

TARGETS = {  # measure -> (limit, lower is better)
    "fanout1000": 1.1, "fanout5000": 1.3, "p2p": 6.0, "latency_p99": 40.0, "idle_bytes": 12_000,
    "deflate_ratio": 1.3,  # fan-out with every client offering deflate / without
}


# -- where and with what ------------------------------------------------------------

def _run(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _npm_version(pkg: str) -> str:
    path = ROOT / "bench" / "node_modules" / pkg / "package.json"
    if not path.exists():
        return "-"
    import json

    return str(json.loads(path.read_text())["version"])


def environment() -> dict[str, Any]:
    """Machine, versions and revision: enough to say what the numbers belong to."""
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    redis = _run([shutil.which("redis-server") or "redis-server", "--version"])
    dirty = bool(_run(["git", "status", "--porcelain", "--", "hubnode", "publisher"]))
    return {
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem / 2**30, 1),
                    "kernel": platform.release(), "nofile_limit": nofile_limit()},
        "versions": {
            "python": platform.python_version(), "hubnode": _version("hubnode"),
            "aiohttp": _version("aiohttp"), "redis-py": _version("redis"),
            "hiredis": _version("hiredis"), "uvloop": _version("uvloop"),
            "orjson": _version("orjson"), "msgpack": _version("msgpack"),
            "python-socketio": _version("python-socketio"),
            "python-engineio": _version("python-engineio"),
            "redis-server": redis.split()[2].removeprefix("v=") if redis else "-",
            "node": _run(["node", "--version"]) or "-",
            "ws (npm)": _npm_version("ws"), "socket.io-client (npm)": _npm_version("socket.io-client"),
            "socket.io (npm)": _npm_version("socket.io"),
            "@socket.io/redis-adapter (npm)": _npm_version("@socket.io/redis-adapter"),
            "@socket.io/redis-emitter (npm)": _npm_version("@socket.io/redis-emitter"),
            "redis (npm)": _npm_version("redis"), "@msgpack/msgpack (npm)": _npm_version("@msgpack/msgpack"),
        },
        "git": {"revision": _run(["git", "rev-parse", "--short", "HEAD"]),
                "hubnode_dirty": dirty},
    }


# -- Markdown -------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _by_system(rows: Sequence[Row]) -> dict[str, Row]:
    return {r["system"]: r for r in rows if "system" in r}


def _ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.{digits}f}x"


def _get(rows: Sequence[Row], system: str, key: str, where: Callable[[Row], bool] | None = None
         ) -> Any:
    for r in rows:
        if r.get("system") == system and (where is None or where(r)):
            return r.get(key)
    return None


def _summary(results: dict[str, list[Row]], systems: Sequence[str]) -> list[str]:
    fan = results.get("fanout", [])
    lines = [
        "| measure (hubnode target) | " + " | ".join(_LABELS.get(s, s) for s in systems)
        + " | python-socketio / hubnode | Node.js Socket.IO / hubnode | hubnode target met |",
        "|---" * (len(systems) + 4) + "|",
    ]
    specs: list[tuple[str, list[Row], str, Callable[[Row], bool] | None, float | None]] = [
        ("fan-out 1k clients: server CPU-s per 100k deliveries (<= 1.1)", fan, "cpu_per_100k",
         lambda r: r["clients"] == 1000, TARGETS["fanout1000"]),
        ("fan-out 5k clients: server CPU-s per 100k deliveries (<= 1.3)", fan, "cpu_per_100k",
         lambda r: r["clients"] == 5000, TARGETS["fanout5000"]),
        ("fan-out 1k clients, 2 KB messages: server CPU-s per 100k deliveries",
         results.get("fanout-2k", []), "cpu_per_100k", None, None),
        ("point-to-point: server CPU-s per 100k deliveries (<= 6)", results.get("p2p", []),
         "cpu_per_100k", None, TARGETS["p2p"]),
        ("latency p99, ms (<= 40)", results.get("latency", []), "p99_ms", None,
         TARGETS["latency_p99"]),
        ("idle: bytes per connection (<= 12,000)", results.get("idle", []), "bytes_per_conn",
         lambda r: r["requested"] == 10_000, TARGETS["idle_bytes"]),
        ("storm: seconds to all joined", results.get("storm", []), "all_joined_s", None, None),
    ]
    cap = results.get("capacity", [])
    size = f"capacity, {max((r.get('requested', 0) for r in cap), default=0):,} connections on 3 nodes"
    specs += [(f"{size}: seconds to all connected", cap, "connect_all_s", None, None),
              (f"{size}: RSS bytes per connection, all nodes", cap, "bytes_per_conn", None, None)]
    for title, rows, key, where, limit in specs:
        if not rows:
            continue
        if rows is cap and key == "connect_all_s":
            lines.append(f"| {size}: connected (attempted) | "
                         + " | ".join(_connected(_by_system(cap).get(s)) for s in systems) + " | - | - | - |")
        values = [_get(rows, s, key, where) for s in systems]
        hub = _get(rows, "hubnode", key, where)
        sio = _get(rows, "socketio", key, where)
        node = _get(rows, "socketio-node", key, where)
        met = "-" if limit is None or hub is None else ("yes" if hub <= limit else "**no**")
        lines.append(f"| {title} | " + " | ".join(_fmt(v) for v in values)
                     + f" | {_ratio(sio, hub)} | {_ratio(node, hub)} | {met} |")
    lost = {s: sum(r.get("lost_all_runs", r.get("missing", 0) + r.get("duplicated", 0))
                   for key in ("fanout", "fanout-2k", "p2p", "latency") for r in results.get(key, [])
                   if r.get("system") == s) for s in systems}
    lines.append("| messages lost or duplicated, all delivery runs (0) | "
                 + " | ".join(_fmt(lost[s]) for s in systems)
                 + " | - | - | " + ("yes" if lost.get("hubnode", 1) == 0 else "**no**") + " |")
    return lines


# (variant, plain, what the ratio is, the limit on it)
_VARIANTS = [
    ("hubnode-deflate", "hubnode", "hubnode: clients offer deflate / plain", TARGETS["deflate_ratio"]),
    ("hubnode-msgpack", "hubnode", "hubnode: msgpack / JSON", None),
    ("socketio-node-deflate", "socketio-node", "Node.js Socket.IO: clients offer deflate / plain", None),
    ("socketio-deflate", "socketio", "python-socketio: clients offer deflate / plain", None),
]


def _wire_forms(results: dict[str, list[Row]]) -> list[str]:
    """Each system with clients that offer permessage-deflate (or speak msgpack) beside itself without."""
    fan = results.get("fanout", [])
    cases: list[tuple[str, list[Row], Callable[[Row], bool] | None]] = [
        ("fan-out 1k, ~100 B", fan, lambda r: r["clients"] == 1000),
        ("fan-out 5k, ~100 B", fan, lambda r: r["clients"] == 5000),
        ("fan-out 1k, 2 KB", results.get("fanout-2k", []), None),
        ("point-to-point", results.get("p2p", []), None),
    ]
    lines = ["| server CPU-s per 100k deliveries | plain | variant | variant / plain "
             "| bytes written per delivery, plain -> variant | target met |", "|---|---|---|---|---|---|"]
    for case, rows, where in cases:
        for variant, plain, title, limit in _VARIANTS:
            v = _get(rows, variant, "cpu_per_100k", where)
            p = _get(rows, plain, "cpu_per_100k", where)
            if v is None:
                continue
            limit = limit if case.startswith("fan-out") else None
            met = "-" if limit is None or p is None or not p else (
                f"yes (<= {limit}x)" if v / p <= limit else f"**no** (<= {limit}x)")
            wire = (f"{_fmt(_get(rows, plain, 'write_bytes_per_delivery', where), 0)} -> "
                    f"{_fmt(_get(rows, variant, 'write_bytes_per_delivery', where), 0)}")
            lines.append(f"| {case}: {title} | {_fmt(p)} | {_fmt(v)} | {_ratio(v, p, 2)} | {wire} | {met} |")
    return lines if len(lines) > 2 else []


def _history(results: dict[str, list[Row]]) -> list[str]:
    """hubnode with history on (`--history-size 1000`) beside hubnode with it off, from this run."""
    fan = results.get("fanout", [])
    specs: list[tuple[str, list[Row], str, Callable[[Row], bool] | None]] = [
        ("fan-out 1k clients: server CPU-s per 100k deliveries", fan, "cpu_per_100k",
         lambda r: r["clients"] == 1000),
        ("fan-out 5k clients: server CPU-s per 100k deliveries", fan, "cpu_per_100k",
         lambda r: r["clients"] == 5000),
        ("point-to-point: server CPU-s per 100k deliveries", results.get("p2p", []), "cpu_per_100k", None),
        ("latency p99, ms", results.get("latency", []), "p99_ms", None),
        ("publish cost: Redis CPU-us per publish (/proc)", results.get("pubcost", []),
         "redis_cpu_us_per_publish", None),
        ("publish cost: Redis CPU-us per publish (its getrusage, INFO cpu)", results.get("pubcost", []),
         "redis_rusage_us_per_publish", None),
        ("publish cost: Redis command-us per publish (INFO commandstats)", results.get("pubcost", []),
         "redis_cmd_us_per_publish", None),
        ("publish cost: node CPU-us per publish", results.get("pubcost", []), "node_cpu_us_per_publish", None),
        ("point-to-point: Redis CPU-us per publish (/proc)", results.get("p2p", []),
         "redis_cpu_us_per_publish", None),
        ("point-to-point: Redis CPU-us per publish (getrusage)", results.get("p2p", []),
         "redis_rusage_us_per_publish", None),
    ]
    lines = ["| measure | history off | history on | on / off |", "|---|---|---|---|"]
    for title, rows, key, where in specs:
        off = _get(rows, "hubnode", key, where)
        on = _get(rows, "hubnode-history", key, where)
        if off is None and on is None:
            continue
        lines.append(f"| {title} | {_fmt(off)} | {_fmt(on)} | {_ratio(on, off, 2)} |")
    return lines if len(lines) > 2 else []


_LABELS = {"hubnode": "hubnode", "hubnode-history": "hubnode, history on", "socketio": "python-socketio",
           "socketio-node": "Node.js Socket.IO", "socketio-deflate": "python-socketio, deflate",
           "baseline": "bare asyncio", "hubnode-deflate": "hubnode, clients offer deflate",
           "hubnode-msgpack": "hubnode, msgpack", "socketio-node-deflate": "Node.js Socket.IO, deflate"}

def _connected(r: Row | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    return f"{r['connected']:,} ({r['clients']:,})"


def _mib(values: Sequence[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _all_runs(r: Row) -> str:
    for key, values in r.items():
        if key.endswith("_all_runs") and isinstance(values, list):
            return ", ".join(_fmt(v) for v in values)
    return "-"


_DELIVERY_COLUMNS = [
    ("delivered / expected", lambda r: f"{r['delivered']:,} / {r['expected']:,}"),
    ("missing + duplicated", lambda r: _fmt(r["missing"] + r["duplicated"])),
    ("deliveries/s", lambda r: _fmt(r["deliveries_per_s"])),
    ("server CPU-s per 100k", lambda r: _fmt(r["cpu_per_100k"])),
    ("server CPU-s (user + sys)",
     lambda r: f"{r['server_cpu_s']:.2f} ({r['server_user_s']:.2f} + {r['server_sys_s']:.2f})"),
    ("Redis CPU-s", lambda r: _fmt(r["redis_cpu_s"])),
    ("Redis CPU-us per publish (/proc; getrusage)", lambda r: f"{_fmt(r.get('redis_cpu_us_per_publish'))}; "
     f"{_fmt(r.get('redis_rusage_us_per_publish'))}"),
    ("load-gen CPU-s per 100k", lambda r: _fmt(r["client_cpu_per_100k"])),
    ("busiest load-gen process, cores", lambda r: _fmt(r["client_max_core"])),
    ("publisher CPU-s", lambda r: _fmt(r["publisher_cpu_s"])),
    ("bytes the nodes wrote per delivery (wchar)", lambda r: _fmt(r.get("write_bytes_per_delivery"), 0)),
    ("wall s", lambda r: _fmt(r["seconds"])),
    ("other load on the machine, cores", lambda r: _fmt(r["other_load_cores"])),
    ("primary figure of each run (median shown)", _all_runs),
]

_LATENCY_COLUMNS = [
    ("p50 ms", lambda r: _fmt(r["p50_ms"])), ("p90 ms", lambda r: _fmt(r["p90_ms"])),
    ("p99 ms", lambda r: _fmt(r["p99_ms"])), ("max ms", lambda r: _fmt(r["max_ms"])),
    ("samples", lambda r: _fmt(r["latency_samples"])),
]

_IDLE_COLUMNS = [
    ("connections (requested)", lambda r: f"{r['clients']:,} ({r['requested']:,})"),
    ("bytes per connection", lambda r: _fmt(r["bytes_per_conn"])),
    ("RSS before -> after, MiB", lambda r: f"{r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f}"),
    ("connect all, s", lambda r: _fmt(r["connect_all_s"])),
    ("connects/s", lambda r: _fmt(r["connects_per_s"])),
    ("connect p50 / p99 ms", lambda r: f"{_fmt(r['connect_p50_ms'])} / {_fmt(r['connect_p99_ms'])}"),
    ("server CPU-s per 1k connects", lambda r: _fmt(r["cpu_per_1k_connects"])),
    ("load-gen processes x source addresses",
     lambda r: f"{r['client_processes']} x {r['source_addresses']}"),
    ("other load on the machine, cores", lambda r: _fmt(r["other_load_cores"])),
    ("primary figure of each run (median shown)", _all_runs),
]

_CAPACITY_COLUMNS = [
    ("connected / attempted (requested)",
     lambda r: f"{r['connected']:,} / {r['clients']:,} ({r['requested']:,})"),
    ("connections each node holds (ESTABLISHED)", lambda r: _mib(r["connected_by_node"])),
    ("reached by one message to everyone", lambda r: _fmt(r["reached_by_broadcast"])),
    ("all connected, s", lambda r: _fmt(r["connect_all_s"])),
    ("connects/s", lambda r: _fmt(r["connects_per_s"])),
    ("connect p50 / p99 ms", lambda r: f"{_fmt(r['connect_p50_ms'])} / {_fmt(r['connect_p99_ms'])}"),
    ("RSS per node before, MiB", lambda r: _mib(r["rss_before_mb"])),
    ("RSS per node after, MiB (peak)",
     lambda r: f"{_mib(r['rss_after_mb'])} ({_mib(r['rss_peak_mb'])})"),
    ("RSS all nodes, MiB", lambda r: f"{r['rss_total_mb']:,.0f}"),
    ("bytes per connection, all nodes", lambda r: _fmt(r["bytes_per_conn"])),
    ("bytes per connection, per node", lambda r: _mib(r["bytes_per_conn_by_node"])),
    ("Redis dataset before -> after, MiB (bytes per connection)",
     lambda r: f"{r['redis_dataset_mb_before']:.1f} -> {r['redis_dataset_mb_after']:.1f} "
               f"({_fmt(r['redis_bytes_per_conn'])})"),
    ("server CPU-s per 1k connects", lambda r: _fmt(r["cpu_per_1k_connects"])),
    ("Redis CPU-s", lambda r: _fmt(r["redis_cpu_s"])),
    ("load-gen processes x source addresses (connects in flight)",
     lambda r: f"{r['client_processes']} x {r['source_addresses']} ({r['connects_in_flight']})"),
    ("load-gen CPU-s (busiest, cores)",
     lambda r: f"{r['client_cpu_s']:.2f} ({r['client_max_core']:.2f})"),
    ("--max-connections per node", lambda r: _fmt(r["max_connections_flag"])),
    ("closed after connecting", lambda r: _fmt(r["closed_during_run"])),
    ("other load on the machine, cores", lambda r: _fmt(r["other_load_cores"])),
    ("primary figure of each run (median shown)", _all_runs),
]

_PUBCOST_COLUMNS = [
    ("delivered / expected", lambda r: f"{r['delivered']:,} / {r['expected']:,}"),
    ("missing + duplicated", lambda r: _fmt(r["missing"] + r["duplicated"])),
    ("Redis CPU-us per publish (/proc)", lambda r: _fmt(r["redis_cpu_us_per_publish"])),
    ("Redis CPU-us per publish (getrusage, INFO cpu)", lambda r: _fmt(r["redis_rusage_us_per_publish"])),
    ("Redis command-us per publish (INFO commandstats)", lambda r: _fmt(r["redis_cmd_us_per_publish"])),
    ("Redis commands in the window", lambda r: ", ".join(
        f"{name} {n:,}" for name, n in list(r.get("redis_commands_by_name", {}).items())[:4])),
    ("node CPU-us per publish", lambda r: _fmt(r["node_cpu_us_per_publish"])),
    ("server CPU-s per 100k deliveries", lambda r: _fmt(r["cpu_per_100k"])),
    ("publisher CPU-s", lambda r: _fmt(r["publisher_cpu_s"])),
    ("wall s", lambda r: _fmt(r["seconds"])),
    ("other load on the machine, cores", lambda r: _fmt(r["other_load_cores"])),
    ("primary figure of each run (median shown)", _all_runs),
]

_STORM_COLUMNS = [
    ("clients x rooms each", lambda r: f"{r['clients']:,} x {r['rooms_per_client']}"),
    ("all joined, s", lambda r: _fmt(r["all_joined_s"])),
    ("clients/s", lambda r: _fmt(r["clients_per_s"])),
    ("connect+join p50 / p99 ms", lambda r: f"{_fmt(r['join_p50_ms'])} / {_fmt(r['join_p99_ms'])}"),
    ("Redis CPU-s", lambda r: _fmt(r["redis_cpu_s"])),
    ("Redis commands (Lua script calls included)", lambda r: _fmt(r["redis_commands"])),
    ("most frequent Redis commands", lambda r: ", ".join(
        f"{name} {n:,}" for name, n in list(r.get("redis_commands_by_name", {}).items())[:4])),
    ("server CPU-s", lambda r: _fmt(r["server_cpu_s"])),
    ("load-gen CPU-s (busiest, cores)",
     lambda r: f"{r['client_cpu_s']:.2f} ({r['client_max_core']:.2f})"),
    ("lobby members in Redis", lambda r: _fmt(r["lobby_members_in_redis"])),
    ("other load on the machine, cores", lambda r: _fmt(r["other_load_cores"])),
    ("primary figure of each run (median shown)", _all_runs),
]


def _table(rows: Sequence[Row], systems: Sequence[str],
           columns: Sequence[tuple[str, Callable[[Row], str]]]) -> list[str]:
    present = [s for s in systems if any(r.get("system") == s for r in rows)]
    out = ["| | " + " | ".join(_LABELS.get(s, s) for s in present) + " |",
           "|---" * (len(present) + 1) + "|"]
    by = _by_system(rows)
    for title, cell in columns:
        out.append(f"| {title} | " + " | ".join(cell(by[s]) if "error" not in by[s]
                                                  else "failed" for s in present) + " |")
    errors = [f"- {_LABELS.get(r['system'], r['system'])}: {r['error']}" for r in rows if "error" in r]
    return out + ([""] + errors if errors else [])


def write_markdown(path: Path, run: dict[str, Any]) -> None:
    results: dict[str, list[Row]] = run["results"]
    systems: list[str] = run["systems"]
    env = run["environment"]
    machine, versions = env["machine"], env["versions"]
    lines = [
        "# Benchmark results", "",
        f"`{run['command']}`, {run['started']} ({run['mode']} run, {run['elapsed_s']:.0f} s); "
        f"hubnode at `{env['git']['revision']}`"
        + (" with uncommitted changes" if env["git"]["hubnode_dirty"] else "") + ".", "",
        f"Machine: {machine['cpus']} cores ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}; open-files limit {machine['nofile_limit']:,} per process. "
        "Everything (Redis, nodes, load generator, publisher) on this one machine, over loopback.", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
        "## Summary", "",
        "Primary figure: CPU-seconds (utime + stime of the node processes, from /proc) per "
        "100,000 deliveries. Lower is better; ratios are python-socketio / hubnode and Node.js "
        "Socket.IO / hubnode from this run (above 1x: hubnode does better)."
        + (f" Each figure is from the median of {run['repeat']} runs (by that scenario's "
           "primary figure)." if run.get("repeat", 1) > 1 else ""),
        "",
        *_summary(results, systems), "",
    ]
    wire = _wire_forms(results)
    if wire:
        lines += ["Clients that offer permessage-deflate (as browsers do) and the `hubnode.msgpack` "
                  "subprotocol, each beside the same server's plain JSON figure from this run (the "
                  "issue's target: hubnode's fan-out with every client offering deflate <= 1.3x). "
                  "hubnode compresses only messages of at least 512 bytes (`--compress-min-bytes`), "
                  "once per node; Node.js Socket.IO (`perMessageDeflate: { threshold: 1024 }`) and "
                  "python-socketio compress for each socket. Bytes written per delivery (the nodes' "
                  "/proc wchar over the window) show whether compression happened.", "", *wire, ""]
    history = _history(results)
    if history:
        lines += ["## What history costs", "",
                  "hubnode with history on every room and user stream (`--history-size 1000`, "
                  "docs/protocol.md; the publisher appends through the history script) beside "
                  "hubnode without, from this run. Redis CPU per publish is redis-server's utime + stime "
                  "over the publishing window divided by the publishes, read from /proc/<pid>/stat "
                  "(10 ms ticks: coarse for a cheap PUBLISH) and from its own getrusage (INFO cpu, "
                  "microseconds); command-us is the time INFO commandstats says the publishing "
                  "commands ran (the script's, which includes its PUBLISH).", "", *history, ""]
    loads = [r.get("other_load_cores", 0.0) for rows in results.values() for r in rows
             if "error" not in r]
    if loads:
        lines += [f"Other processes on the machine used at most {max(loads):.2f} cores during "
                  "a measuring window (each scenario's table has the figure; the benchmark waits "
                  "for a quiet machine before each one).", ""]
    if run.get("plot"):
        lines += [f"![headline figures]({run['plot']})", ""]
    if run.get("plot_scaling"):
        lines += [f"![fan-out CPU per delivery vs clients]({run['plot_scaling']})", ""]
    if not run.get("hub_cluster", True):
        lines += ["**hubnode ran as a single node with the embedded broker, published to by "
                  "`POST /broadcast`** (cluster mode was not available): its figures include "
                  "an HTTP request per published message and are not comparable with "
                  "the two-node Redis set-ups.", ""]
    sections = [
        ("fanout", "Fan-out", "All clients in one room across 2 nodes; an external publisher "
         "floods ~100-byte messages through Redis as fast as it can.", _DELIVERY_COLUMNS),
        ("fanout-2k", "Fan-out, 2 KB messages", "All clients in one room across 2 nodes; an external "
         "publisher floods ~2 KB messages (a list of records, values drawn per message so each "
         "differs; deflate shrinks one to about a third) through Redis as fast as it can. Above the 512-byte "
         "`--compress-min-bytes`: hubnode compresses them for clients that offered deflate.",
         _DELIVERY_COLUMNS),
        ("p2p", "Point-to-point", "Each client its own user across 2 nodes; messages to "
         "random users (fixed seed), flooded.", _DELIVERY_COLUMNS),
        ("latency", "Latency", "All clients in one room across 2 nodes; the publisher sends at "
         "a fixed rate, each message carrying time.monotonic(); clients subtract it from "
         "CLOCK_MONOTONIC at receipt (same host, same clock).",
         [*_LATENCY_COLUMNS, *_DELIVERY_COLUMNS]),
        ("idle", "Idle connections", "Idle connections (each its own user) on one node; "
         "RSS delta / N from /proc.", _IDLE_COLUMNS),
        ("storm", "Connection storm", "Clients connect at once to 2 nodes and each joins "
         "`lobby` and one of 100 team rooms; hubnode writes membership to Redis "
         "(python-socketio, Node.js Socket.IO and the baseline keep rooms in process memory only).",
         _STORM_COLUMNS),
        ("pubcost", "Publish cost", "100 clients in 10 rooms across 2 nodes; the publisher floods "
         "messages round-robin to the rooms. What one publish costs Redis and the nodes (with "
         "history on, each room's 1,000 entries are full after the first 10,000 publishes: "
         "every later append also trims).", _PUBCOST_COLUMNS),
        ("capacity", "Capacity: connections over 3 nodes", "Idle connections (each its own user) "
         "spread evenly over 3 nodes on one Redis (hubnode with `--max-connections 19000`), from "
         "several load-generating processes bound to source addresses 127.0.0.2, 127.0.0.3, ... "
         "(the Python client binds none). \"All connected\" runs from the first connect to the last "
         "one ready; RSS (VmRSS, peak VmHWM) per node is read before and 3 s after; bytes per "
         "connection is the RSS growth over the connections held; one message to everyone then "
         "proves the connections live.", _CAPACITY_COLUMNS),
    ]
    for key, title, text, columns in sections:
        rows = results.get(key)
        if not rows:
            continue
        lines += [f"## {title}", "", text, ""]
        groups: dict[Any, list[Row]] = {}
        for r in rows:
            groups.setdefault(_group_key(key, r), []).append(r)
        for group, group_rows in groups.items():
            if group:
                lines += [f"### {group}", ""]
            lines += [*_table(group_rows, systems, columns), ""]
    if run.get("profile"):
        lines += ["## Where hubnode's CPU goes", "", *run["profile"], ""]
    lines += [*_METHOD, ""]
    path.write_text("\n".join(lines))


def _group_key(key: str, r: Row) -> str:
    if key in ("fanout", "fanout-2k"):
        return f"{r.get('clients', 0):,} clients, {r.get('messages', 0):,} messages"
    if key == "p2p":
        return f"{r.get('clients', 0):,} clients, {r.get('messages', 0):,} messages"
    if key == "latency":
        return (f"{r.get('clients', 0):,} clients, {r.get('rate', 0):g} msg/s for "
                f"{r.get('duration_s', 0):g} s")
    if key == "idle":
        return f"{r.get('requested', 0):,} connections requested"
    if key == "pubcost":
        return f"{r.get('messages', 0):,} publishes to {r.get('rooms', 0)} rooms"
    if key == "capacity":
        return f"{r.get('requested', 0):,} connections requested on {r.get('nodes', 3)} nodes"
    return ""


_METHOD = [
    "## How the numbers were taken", "",
    "- `python -m bench` starts, for each scenario and each system, a private `redis-server` "
    "and fresh nodes on 127.0.0.1, then the load generator: Node.js processes "
    "(`bench/client/load.js`; npm `ws` for hubnode and the baseline, `socket.io-client` over "
    "the websocket transport for python-socketio), two by default. Its CPU is measured like "
    "the servers' and reported per scenario (\"busiest load-gen process, cores\": 1.0 would "
    "mean a saturated client).",
    "- The same settings for every server: no per-message compression (clients do not offer "
    "permessage-deflate, except in the \"deflate\" columns), no application pings (`--ping-interval 0` for hubnode, "
    "Engine.IO ping interval 3600 s), no rate limit (`--rate 0`), uvloop for the Python servers.",
    "- hubnode: `hubnode --redis-url ... --node-id nodeA|nodeB` (cluster mode); the publisher "
    "PUBLISHes the msgpack envelope of docs/redis.md (`publisher.targets.envelope_for`). "
    "python-socketio: `AsyncServer(client_manager=AsyncRedisManager(url), async_mode='aiohttp')` "
    "(`bench/servers/sio_server.py`), published to with a write-only `AsyncRedisManager`'s "
    "payloads; users are rooms `user:<id>` entered on connect. \"python-socketio, deflate\" "
    "is the same server with clients that offer permessage-deflate, as browsers and "
    "socket.io-client do by default: aiohttp then compresses every frame. Bare asyncio: "
    "`bench/servers/baseline.py`, an aiohttp server with one redis-py subscriber that writes "
    "one pre-built frame to every member's transport (no envelope, validation, membership "
    "or metrics). It is the floor for fan-out, where the cost is the socket writes; per "
    "message it pays redis-py's PubSub parsing, which hubnode's own RESP reader undercuts, "
    "so on point-to-point hubnode can come out below it.",
    "- Node.js Socket.IO: socket.io v4 with `@socket.io/redis-adapter` on the `redis` npm client "
    "(`bench/servers/sio_node.js`), one Node.js process per node, the same rooms and `user:<id>` "
    "rooms as python-socketio. It is published to the way a Node.js worker does with "
    "`@socket.io/redis-emitter`: the emitter's msgpack `[uid, packet, opts]` on `socket.io#/#<room>#` "
    "(or `socket.io#/#` for everyone), built in Python and checked byte for byte against the "
    "emitter in bench/node_modules at the start of every run. Every adapter node PSUBSCRIBEs "
    "`socket.io#/#*`, so each node receives every publish and drops those for rooms it does not hold.",
    "- hubnode, clients offer deflate: the same nodes (compression on, as by default) with load "
    "clients that offer `permessage-deflate; client_max_window_bits` as browsers do; the node "
    "answers `server_no_context_takeover; client_no_context_takeover` and compresses each message "
    "of at least 512 bytes once for all its sockets. hubnode, msgpack: clients on the "
    "`hubnode.msgpack` subprotocol (binary frames, one msgpack map each, both ways; the load "
    "client recognises bench frames by their bytes, as the JSON one does, and decodes the rest). "
    "Node.js Socket.IO, deflate: `sio_node.js --deflate 1024` (`perMessageDeflate: { threshold: "
    "1024 }`) with clients offering the extension: ws then compresses for each socket with its "
    "own zlib context (context takeover, so it compresses small frames too) and Socket.IO can no "
    "longer send one pre-encoded frame to every socket.",
    "- hubnode, history on: the same nodes with `--history-size 1000` (every room and user "
    "stream); the publisher runs the history script (EVALSHA of `publisher/lua/publish.lua`, "
    "keys and arguments from `publisher.history.publish_call`), which appends to the stream, "
    "trims it to exactly 1,000 and PUBLISHes the envelope with its offset and epoch.",
    "- Before each window, a warm-up message to everyone is repeated until every client got "
    "one. The window opens just before the first publish and closes at the last delivery; "
    "flooded messages are built before it opens. Delivered counts are per client and compared "
    "with what each client should have got (missing and duplicated are counted separately).",
    "- The machine has 2 cores shared by everything: deliveries/s and latency are what this "
    "box does with the load generator competing for the same cores; CPU-seconds per delivery "
    "are the figure that carries over to other machines.",
    "- Idle connections on one node are capped by the per-process open-files limit (hard "
    "limit here, not raisable without CAP_SYS_RESOURCE): a larger request is clamped and the "
    "table says so. Several client processes and source addresses 127.0.0.x avoid the "
    "client-side limits (file descriptors, ~28k ephemeral ports per address pair).",
]


# -- PNG -------------------------------------------------------------------------------

SCALING_SYSTEMS = ("hubnode", "socketio-node", "socketio")


def plot_scaling(path: Path, run: dict[str, Any]) -> bool:
    """Fan-out CPU per delivery against the number of clients, one line per system
    (hubnode, Node.js Socket.IO, python-socketio), on a log scale: how the cost of one
    delivery moves as rooms grow. False without matplotlib or fan-out results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows: list[Row] = [r for r in run["results"].get("fanout", []) if "error" not in r]
    lines = {s: sorted((r["clients"], r["cpu_per_100k"]) for r in rows
                       if r.get("system") == s and r.get("cpu_per_100k") is not None)
             for s in SCALING_SYSTEMS}
    lines = {s: pts for s, pts in lines.items() if pts}
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for system, pts in lines.items():
        ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=_LABELS.get(system, system))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients in the room (2 nodes)")
    ax.set_ylabel("server CPU-s per 100k deliveries")
    ax.set_title("fan-out: CPU per delivery vs clients", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot(path: Path, run: dict[str, Any]) -> bool:
    """A small PNG of the headline figures; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results: dict[str, list[Row]] = run["results"]
    systems: list[str] = run["systems"]
    panels: list[tuple[str, list[tuple[str, list[Row], str, Callable[[Row], bool] | None]]]] = [
        ("server CPU-s per 100k deliveries", [
            ("fan-out 1k", results.get("fanout", []), "cpu_per_100k", lambda r: r["clients"] == 1000),
            ("fan-out 5k", results.get("fanout", []), "cpu_per_100k", lambda r: r["clients"] == 5000),
            ("fan-out 2 KB", results.get("fanout-2k", []), "cpu_per_100k", None),
            ("p2p", results.get("p2p", []), "cpu_per_100k", None)]),
        ("latency, ms (20 msg/s x 1k)", [
            ("p50", results.get("latency", []), "p50_ms", None),
            ("p99", results.get("latency", []), "p99_ms", None)]),
        ("idle KiB per connection", [
            ("10k", results.get("idle", []), "bytes_per_conn", lambda r: r["requested"] == 10_000)]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.4))
    colours = {"hubnode": "#2a7ab0", "hubnode-history": "#7fb3d5", "socketio": "#d9822b",
               "socketio-node": "#3c9a5f", "socketio-deflate": "#f0b27a", "baseline": "#8a8a8a",
               "hubnode-deflate": "#1b4f72", "hubnode-msgpack": "#5dade2", "socketio-node-deflate": "#82e0aa"}
    for ax, (title, groups) in zip(axes, panels, strict=True):
        shown = [s for s in systems
                 if any(_get(rows, s, key, where) is not None for _l, rows, key, where in groups)]
        width = 0.8 / max(1, len(shown))
        for k, system in enumerate(shown):
            values = []
            for _label, rows, key, where in groups:
                v = _get(rows, system, key, where)
                if v is not None and key == "bytes_per_conn":
                    v = v / 1024
                values.append(v if v is not None else 0.0)
            xs = [g + k * width for g in range(len(groups))]
            ax.bar(xs, values, width, label=_LABELS.get(system, system),
                   color=colours.get(system))
        ax.set_xticks([g + width * (len(shown) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([g[0] for g in groups])
        ax.set_title(title, fontsize=10)
        if title.startswith("latency") and any(
                (_get(rows, s, key, where) or 0) > 0 for s in systems for _l, rows, key, where in groups):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
