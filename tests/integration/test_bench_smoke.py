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


async def test_bench_capacity_holds_every_connection_on_three_nodes(tmp_path: Path) -> None:
    """bench.capacity, tiny: 600 connections over 3 hubnode nodes all connect, evenly and live; RSS per node."""
    from bench.capacity import capacity  # imported here: the file's header is shared with other tests' edits

    ctx = Context(log_dir=tmp_path, client="python", client_processes=2, timeout=60)
    result = await capacity(HubSystem(), ctx, clients=600)
    assert (result["connected"], result["clients"], result["failed"]) == (600, 600, 0), result
    assert result["connected_by_node"] == [200, 200, 200], result
    assert result["reached_by_broadcast"] == 600 and result["closed_during_run"] == 0, result
    assert result["max_connections_flag"] == 19_000
    assert len(result["rss_after_mb"]) == len(result["rss_before_mb"]) == 3 and min(result["rss_after_mb"]) > 0
    assert result["rss_total_mb"] > 0 and result["bytes_per_conn"] > 0 and result["connect_all_s"] > 0


async def test_bench_soak_loses_nothing_and_leaves_no_membership_keys(tmp_path: Path) -> None:
    """bench.soak, 300 clients for 9 s, both variants: nothing lost or duplicated where it may not be, no key left."""
    from bench import soak
    from bench.loadgen import ensure_node_clients

    ensure_node_clients()  # `make test` installed Node.js; this runs `npm ci` in bench/ once
    args = soak.parse_args(["--soak-clients", "300", "--soak-minutes", "0.15", "--soak-interval", "3",
                            "--soak-rooms", "30", "--soak-rate", "200", "--soak-mix", "10:9:1",
                            "--out", str(tmp_path)])
    report = await soak.run(args)
    assert report["ok"], soak.summary(report)
    plain, history = report["variants"]
    assert (plain["history"], history["history"]) == (False, True)
    for v in (plain, history):
        kinds = v["kinds"]
        for kind, k in kinds.items():
            assert k["published"] > 0 and k["delivered"] > 0 and k["duplicated"] == 0, (kind, k)
            assert k["expected"] == k["delivered"] + k["lost"], (kind, k)
        assert kinds["room"]["lost"] == kinds["user"]["lost"] == 0, kinds
        assert v["foreign"] == 0 and v["close"]["clean"] == 300 and v["close"]["forced"] == 0, v["close"]
        assert v["keys_with_clients"]["groups"]["membership"] > 0, v["keys_with_clients"]
        left = v["keys_after_close"]
        assert left["groups"]["membership"] == left["groups"]["other"] == 0, left
        assert left["membership_keys"] == [] and left["membership_gone_after_s"] is not None, left
        assert [row["interval"] for row in v["intervals"]] == [0, 1, 2]
        assert all(row["deliveries"] > 0 and row["p99_ms"] > 0 for row in v["intervals"]), v["intervals"]
    assert plain["kinds"]["all"]["lost"] == 0 and plain["reconnects"] == 0 and plain["events"] == []
    assert [e["event"] for e in history["events"]] == ["SIGKILL", "CLIENT KILL pubsub"], history["events"]
    assert history["events"][1]["killed"] == 1 and history["nodes_alive_at_end"] == [False, True, True]
    assert history["reconnects"] > 0 and history["kinds"]["user"]["recovered"] > 0
    assert sum(k["not_recovered"] for k in history["kinds"].values()) == 0, history["kinds"]
    text = soak.markdown(report)
    assert "## hubnode (history off, no faults)" in text and "**OK**" in text


async def test_bench_deflate_and_msgpack_clients_get_everything(tmp_path: Path) -> None:
    """hubnode-deflate and hubnode-msgpack, tiny 2 KB fan-outs: nothing lost or duplicated, and compressed on the wire.

    The Python client always; the Node one (load.js, what the benchmark runs) too when bench/node_modules has it.
    """
    import shutil  # imported here: the file's header is shared with other tests' edits

    from bench.scenarios import TEXT_BYTES
    from bench.systems import HubDeflateSystem, HubMsgpackSystem

    clients = ["python"]
    if shutil.which("node") and (Path(__file__).resolve().parents[2] / "bench" / "node_modules" / "@msgpack"
                                 / "msgpack" / "package.json").exists():
        clients.append("node")
    for client in clients:
        ctx = Context(log_dir=tmp_path / client, client=client, client_processes=1, timeout=60)
        for system in (HubDeflateSystem(), HubMsgpackSystem()):
            r = await fanout(system, ctx, clients=20, messages=20, size=TEXT_BYTES)
            assert (r["delivered"], r["missing"], r["duplicated"]) == (400, 0, 0), (client, system.name, r)
            assert r["errors"] == [] and r["closed_during_run"] == 0, (client, system.name, r)
            if system.deflate:  # ~2 KB frames go out at about a third of their size
                assert r["write_bytes_per_delivery"] < 0.5 * TEXT_BYTES, (client, r)
            else:  # msgpack: ~3/4 of the JSON
                assert r["write_bytes_per_delivery"] > 0.6 * TEXT_BYTES, (client, r)
