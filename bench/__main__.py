"""`python -m bench`: the short benchmark; `--full` for the figures in bench/RESULTS.md.

Runs every scenario against every system in one invocation (hubnode, hubnode
with history on, python-socketio, Node.js Socket.IO, and the bare asyncio
baseline), writes the JSON to
bench/out/, a Markdown report (bench/RESULTS.md for --full, otherwise
bench/out/RESULTS-quick.md) and, when matplotlib is installed, a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench import capacity, scenarios, soak
from bench.loadgen import ensure_node_clients
from bench.procs import ROOT, background_load
from bench.report import environment, plot, plot_scaling, write_markdown
from bench.scenarios import Context
from bench.systems import SYSTEMS, System, available_systems, hub_cluster_available, make_systems

SCENARIOS = ("fanout", "fanout-2k", "p2p", "latency", "idle", "storm", "pubcost", "capacity")
QUICK_SCENARIOS = tuple(s for s in SCENARIOS if s != "capacity")  # a short run skips the 50k connections


@dataclass(frozen=True)
class Plan:
    """The sizes of one run."""

    fanout: tuple[tuple[int, int], ...]  # (clients, messages)
    p2p: tuple[int, int]  # (clients, messages)
    latency: tuple[int, float, float]  # (clients, messages/s, seconds)
    idle: tuple[int, ...]  # connections
    storm: int  # clients
    pubcost: int  # publishes (to 10 rooms of 10 clients each)
    capacity: int = 50_000  # connections over 3 nodes (--capacity-clients)
    fanout_2k: tuple[int, int] = (1000, 300)  # (clients, messages) of ~2 KB: compression happens


QUICK = Plan(fanout=((1000, 100), (5000, 40)), p2p=(2000, 20_000), latency=(1000, 20, 5),
             idle=(10_000,), storm=5000, pubcost=20_000)
FULL = Plan(fanout=((1000, 1000), (5000, 200)), p2p=(2000, 20_000), latency=(1000, 20, 10),
            idle=(10_000, 50_000), storm=10_000, pubcost=40_000, fanout_2k=(1000, 1000))

Job = tuple[str, dict[str, Any], Callable[[System], Awaitable[dict[str, Any]]]]


def jobs(plan: Plan, ctx: Context, only: set[str]) -> list[Job]:
    """(scenario, parameters, run) in the order they run; every system runs each in turn."""
    out: list[Job] = []
    if "fanout" in only:
        for clients, messages in plan.fanout:
            out.append(("fanout", {"clients": clients, "messages": messages},
                        partial(scenarios.fanout, ctx=ctx, clients=clients, messages=messages)))
    if "fanout-2k" in only:
        clients, messages = plan.fanout_2k
        out.append(("fanout-2k", {"clients": clients, "messages": messages,
                                  "message_bytes": scenarios.TEXT_BYTES},
                    partial(scenarios.fanout, ctx=ctx, clients=clients, messages=messages,
                            size=scenarios.TEXT_BYTES)))
    if "p2p" in only:
        clients, messages = plan.p2p
        out.append(("p2p", {"clients": clients, "messages": messages},
                    lambda s: scenarios.point_to_point(s, ctx, clients, messages)))
    if "latency" in only:
        n, rate, seconds = plan.latency
        out.append(("latency", {"clients": n, "rate": rate, "duration_s": seconds},
                    lambda s: scenarios.latency(s, ctx, n, rate, seconds)))
    if "idle" in only:
        for conns in plan.idle:
            out.append(("idle", {"requested": conns, "clients": conns},
                        partial(scenarios.idle, ctx=ctx, clients=conns)))
    if "storm" in only:
        out.append(("storm", {"clients": plan.storm},
                    lambda s: scenarios.storm(s, ctx, plan.storm)))
    if "pubcost" in only:
        out.append(("pubcost", {"messages": plan.pubcost},
                    lambda s: scenarios.publish_cost(s, ctx, plan.pubcost)))
    if "capacity" in only:
        out.append(("capacity", {"requested": plan.capacity, "clients": plan.capacity},
                    partial(capacity.capacity, ctx=ctx, clients=plan.capacity)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full sizes (several minutes)")
    p.add_argument("--systems", default=",".join(available_systems()),
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all this checkout can run)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated scenarios, from {', '.join(SCENARIOS)} "
                        "(default: all with --full, all but capacity otherwise)")
    p.add_argument("--capacity-clients", type=int, default=50_000, metavar="N",
                   help="connections of the capacity scenario, spread over 3 nodes (50,000)")
    p.add_argument("--client", choices=("node", "python"), default="node",
                   help="load generator: Node.js ws/socket.io-client (default) or aiohttp")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown report (default: bench/RESULTS.md with --full, "
                        "else bench/out/RESULTS-quick.md)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each measurement N times and report the median run")
    p.add_argument("--quiet-below", type=float, default=0.3, metavar="CORES",
                   help="before each measurement wait until other processes use less (0.3)")
    p.add_argument("--quiet-wait", type=float, default=None, metavar="SECONDS",
                   help="longest such wait (default 120 with --full, else 10)")
    p.add_argument("--report-from", type=Path, default=None, metavar="JSON",
                   help="only rewrite the Markdown (and PNG) from a saved results JSON")
    p.add_argument("--profile", action="store_true",
                   help="also profile hubnode with py-spy (separate runs, no figures)")
    soak.add_arguments(p)
    return p.parse_args(argv)


PRIMARY = {"fanout": "cpu_per_100k", "fanout-2k": "cpu_per_100k", "p2p": "cpu_per_100k", "latency": "p99_ms",
           "idle": "bytes_per_conn", "storm": "all_joined_s", "pubcost": "redis_rusage_us_per_publish",
           "capacity": "connect_all_s"}


def median_run(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median primary figure, carrying every run's figure and all losses."""
    key = PRIMARY[scenario]
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    ordered = sorted(good, key=lambda r: r[key])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["runs"] = len(runs)
    chosen["failed_runs"] = len(runs) - len(good)
    chosen[f"{key}_all_runs"] = [r[key] for r in good]
    if "missing" in chosen:
        chosen["lost_all_runs"] = sum(r["missing"] + r["duplicated"] for r in good)
    return chosen


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most `max_wait` s) until other processes keep under `threshold` cores busy.

    The machine may be shared: a test suite running beside the benchmark would
    inflate latency and deliveries/s (CPU-seconds per delivery much less).
    Returns the last load seen.
    """
    end = time.monotonic() + max_wait
    while True:
        load = background_load(1.0)
        if load <= threshold or time.monotonic() >= end:
            return load
        log(f"waiting for a quieter machine: other processes use {load:.2f} cores")
        time.sleep(4.0)


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def headline(scenario: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    if scenario in ("fanout", "fanout-2k", "p2p", "latency"):
        text = (f"{r['delivered']:,}/{r['expected']:,} delivered, {r['deliveries_per_s']:,.0f}/s, "
                f"{r['cpu_per_100k']:.2f} CPU-s/100k, load-gen busiest {r['client_max_core']:.2f} cores")
        if scenario == "latency":
            text += f", p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms max {r['max_ms']:.0f} ms"
        return text
    if scenario == "pubcost":
        return (f"{r['delivered']:,}/{r['expected']:,} delivered; per publish: Redis "
                f"{r['redis_cpu_us_per_publish']:.1f} CPU-us /proc, {r['redis_rusage_us_per_publish']:.1f} "
                f"getrusage (commands {r['redis_cmd_us_per_publish']:.1f} us), "
                f"nodes {r['server_cpu_s'] / r['publishes'] * 1e6:.1f} CPU-us")
    if scenario == "idle":
        return (f"{r['clients']:,} conns, {r['bytes_per_conn']:,.0f} B/conn, "
                f"connect all {r['connect_all_s']:.1f} s")
    if scenario == "capacity":
        return (f"{r['connected']:,}/{r['clients']:,} connected over {r['nodes']} nodes in "
                f"{r['connect_all_s']:.1f} s, RSS {r['rss_total_mb']:,.0f} MiB "
                f"({r['bytes_per_conn']:,.0f} B/conn), reached {r['reached_by_broadcast']:,}")
    return (f"all joined in {r['all_joined_s']:.1f} s, Redis CPU {r['redis_cpu_s']:.2f} s, "
            f"{r['redis_commands']:,} commands")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = replace(FULL if args.full else QUICK, capacity=args.capacity_clients)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    if args.only is None:
        args.only = ",".join(SCENARIOS if args.full else QUICK_SCENARIOS)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = (set(names) - set(SYSTEMS)) | (only - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown system or scenario: {', '.join(sorted(unknown))}")
    if args.client == "node":
        ensure_node_clients()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    ctx = Context(log_dir=args.out / "logs" / stamp, client=args.client,
                  client_processes=args.client_processes)
    systems = make_systems(names)
    if "hubnode" in names and not hub_cluster_available():
        log("hubnode has no cluster mode yet (hubnode/cluster.py): single node + POST /broadcast")
    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {}
    for scenario, params, job in jobs(plan, ctx, only):
        runs: dict[str, list[dict[str, Any]]] = {}
        for attempt in range(args.repeat):
            for system in systems:
                if scenario not in system.scenarios:
                    continue
                background = await asyncio.to_thread(wait_quiet, args.quiet_below, args.quiet_wait)
                log(f"{scenario} {params} {system.label} #{attempt + 1} "
                    f"(other load {background:.2f} cores) ...")
                try:
                    r = await job(system)
                except Exception as exc:  # one failure must not lose the rest of the run
                    r = {"system": system.name, **params, "error": f"{type(exc).__name__}: {exc}"}
                r["background_before_cores"] = background
                runs.setdefault(system.name, []).append(r)
                log(f"  {system.label}: {headline(scenario, r)}")
        results.setdefault(scenario, []).extend(median_run(scenario, rs) for rs in runs.values())
    profile: list[str] = []
    if args.profile:
        log("profiling hubnode with py-spy ...")
        from bench.profile import profile_hub

        profile = await profile_hub(ctx, args.out)
    return {
        "command": "python -m bench " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "python -m bench",
        "mode": "full" if args.full else "quick", "started": stamp,
        "elapsed_s": time.monotonic() - started, "systems": names, "repeat": args.repeat,
        "hub_cluster": hub_cluster_available(), "plan": plan.__dict__,
        "environment": environment(), "results": results, "profile": profile,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.soak:
        return soak.main(args)
    if args.quiet_wait is None:
        args.quiet_wait = 120.0 if args.full else 10.0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_from is not None:
        report = json.loads(args.report_from.read_text())
        mode = report["mode"]
        json_path = args.report_from
    else:
        report = asyncio.run(run(args))
        mode = report["mode"]
        json_path = args.out / f"results-{mode}-{report['started']}.json"
        text = json.dumps(report, indent=1, default=str)
        json_path.write_text(text)
        (args.out / f"latest-{mode}.json").write_text(text)
        if mode == "full" and args.results is None:
            (ROOT / "bench" / "RESULTS.json").write_text(text)  # what RESULTS.md was made from
    md = args.results or (ROOT / "bench" / "RESULTS.md" if mode == "full"
                          else args.out / "RESULTS-quick.md")
    png = md.with_suffix(".png")
    if plot(png, report):
        report["plot"] = png.name
    scaling = md.with_name(md.stem + "-fanout.png")
    if plot_scaling(scaling, report):
        report["plot_scaling"] = scaling.name
    write_markdown(md, report)
    log(f"wrote {json_path}, {md}" + (f", {png}" if report.get("plot") else ""))
    failed = [r for rows in report["results"].values() for r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
