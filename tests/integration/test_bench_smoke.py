"""Smoke test of the benchmark harness (bench/) against hubnode only, with the Python client."""

from __future__ import annotations

from pathlib import Path

from bench import redis_scale
from bench.scenarios import Context, fanout
from bench.systems import HubSystem


async def test_bench_fanout_delivers_everything(tmp_path: Path) -> None:
    """A 400-delivery fan-out through the bench harness arrives complete, without duplicates."""
    ctx = Context(log_dir=tmp_path, client="python", client_processes=1, timeout=60)
    result = await fanout(HubSystem(), ctx, clients=20, messages=20)
    assert (result["delivered"], result["missing"], result["duplicated"]) == (400, 0, 0), result


async def test_bench_redis_scale_runs_on_one_redis_and_a_cluster(tmp_path: Path) -> None:
    """bench.redis_scale measures both topologies in one run; nothing lost and every primary takes publishes."""
    args = redis_scale.parse_args(["--clients", "30", "--seconds", "0.5", "--window", "300", "--fanout-clients", "10",
                                   "--fanout-messages", "10", "--client", "python", "--client-processes", "1",
                                   "--quiet-wait", "0", "--out", str(tmp_path)])
    report = await redis_scale.run(args)
    assert redis_scale.failures(report) == [], redis_scale.table(report)
    single, cluster = report["results"]["single"], report["results"]["cluster"]
    assert single["fanout"]["delivered"] == cluster["fanout"]["delivered"] == 100
    for kind in ("p2p_rooms", "p2p_users"):
        assert single[kind]["delivered"] > 0 and len(single[kind]["primary_publishes"]) == 1
        assert len(cluster[kind]["primary_publishes"]) == 3 and min(cluster[kind]["primary_publishes"]) > 0
        assert len(cluster[kind]["replica_cpu_s"]) == 3
