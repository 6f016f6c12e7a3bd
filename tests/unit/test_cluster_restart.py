"""deploy/cluster.py's supervision: the restart policy, the backoff and Cluster.check() on a fake clock.

check() is driven with explicit `now` values, so the backoff is stepped
through without waiting; the children are real, short-lived Python
processes standing in for a node (nothing answers its /readyz).
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.cluster import (
    BACKOFF_MAX,
    POLICIES,
    READY_WARN,
    Cluster,
    describe_exit,
    parse_args,
    port_problem,
    restart_delay,
)
from tests.helpers import wait_until_sync

CRASH = [sys.executable, "-c", "import sys; print('Traceback: boom', flush=True); sys.exit(3)"]
CLEAN_EXIT = [sys.executable, "-c", "pass"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.mark.parametrize(("policy", "code", "expected"), [
    ("no", -9, None), ("no", 1, None), ("no", 0, None),
    ("on-failure", -9, 1.0), ("on-failure", 1, 1.0), ("on-failure", 0, None),
    ("always", -9, 1.0), ("always", 0, 1.0),
])
def test_policy_decides_whether_to_restart(policy: str, code: int, expected: float | None) -> None:
    assert restart_delay(policy, code, ran_for=0.5, last_delay=None) == expected


def test_backoff_doubles_to_30_s_and_resets_after_10_s_of_running() -> None:
    delays: list[float] = []
    last: float | None = None
    for _ in range(8):  # a child that dies at once, again and again
        last = restart_delay("on-failure", 1, ran_for=0.2, last_delay=last)
        assert last is not None
        delays.append(last)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay("always", -9, ran_for=9.9, last_delay=16) == 30 == BACKOFF_MAX
    assert restart_delay("always", -9, ran_for=10.0, last_delay=30) == 1  # it ran 10 s: a fresh start


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="on-failure"):
        restart_delay("unless-stopped", 1, 0, None)
    with pytest.raises(ValueError, match="restart policy"):
        Cluster(port=0, nodes=1, restart="sometimes")


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-9) == "-9 (signal SIGKILL)"
    assert describe_exit(-int(signal.SIGTERM)) == "-15 (signal SIGTERM)"
    assert describe_exit(0) == "0"
    assert describe_exit(3) == "3"
    assert describe_exit(-200) == "-200 (signal 200)"


def test_cli_defaults_fixed_redis_port_and_on_failure() -> None:
    args, node_args = parse_args(["--port", "0", "--", "--heartbeat", "0.5"])
    assert (args.redis_port, args.restart, args.port) == (6380, "on-failure", 0)
    assert node_args == ["--heartbeat", "0.5"]
    assert parse_args(["--redis-port", "0", "--restart", "no"])[0].redis_port == 0
    for bad in (["--restart", "sometimes"], ["--redis-port", "70000"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert set(POLICIES) == {"no", "on-failure", "always"}


def test_port_problem_sees_a_listener_only() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_problem("127.0.0.1", port) == "is already in use"
    assert port_problem("127.0.0.1", port) is None


MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """Clusters that are never started; their stand-in children are stopped after the test."""
    made: list[Cluster] = []

    def factory(restart: str = "on-failure") -> Cluster:
        cluster = Cluster(port=0, nodes=2, workdir=tmp_path / f"c{len(made)}", restart=restart)
        cluster.dir.mkdir()
        made.append(cluster)
        return cluster

    yield factory
    for cluster in made:
        for proc in cluster.procs.values():
            proc.stop(5)


def exited(cluster: Cluster, name: str) -> None:
    """Wait (deadline-bound) for the stand-in child `name` to exit."""
    cluster.procs[name].popen.wait(10)


def test_check_reports_a_crash_with_its_log_and_restarts_with_backoff(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    cluster._spawn("node1", SLEEPER)
    first = cluster._spawn("node2", CRASH)
    exited(cluster, "node2")
    t0 = time.monotonic()

    [event] = cluster.check(t0)
    assert event.kind == "exited" and event.name == "node2"
    head, *tail = event.text.splitlines()
    assert head == ("node2 exited with 3; its clients reconnect through nginx to node1; "
                    "restarting it in 1 s (--restart on-failure)")
    assert any("Traceback: boom" in line for line in tail), event.text  # an error code: its log's end
    assert cluster.crashed == ["node2"]
    assert cluster.check(t0 + 0.9) == [] and cluster.procs["node2"] is first  # reported once, not yet due

    assert cluster.check(t0 + 1.0) == []  # due: restarted with the same command, not ready yet
    second = cluster.procs["node2"]
    assert second is not first and second.pid != first.pid
    assert cluster.commands["node2"] == CRASH
    exited(cluster, "node2")
    [event] = cluster.check(t0 + 1.5)  # died again 0.5 s after its restart: reported again, 2 s
    assert event.text.startswith("node2 exited with 3;") and "restarting it in 2 s" in event.text

    assert cluster.check(t0 + 3.5) == []
    exited(cluster, "node2")
    [event] = cluster.check(t0 + 3.5 + 10)  # this run lasted 10 s: back to 1 s
    assert "restarting it in 1 s" in event.text
    assert cluster.procs["node1"].alive()
    assert "Traceback: boom" in (cluster.dir / "node2.log").read_text().split("Traceback: boom", 1)[1]  # appended


def test_check_does_not_restart_under_no_or_after_exit_0_under_on_failure(make_cluster: MakeCluster) -> None:
    for policy, cmd, code in (("no", SLEEPER, "-9 (signal SIGKILL)"), ("on-failure", CLEAN_EXIT, "0")):
        cluster = make_cluster(restart=policy)
        cluster._spawn("node1", cmd)
        cluster._spawn("node2", SLEEPER)
        if cmd is SLEEPER:
            cluster.procs["node1"].signal(signal.SIGKILL)
        exited(cluster, "node1")
        first = cluster.procs["node1"]
        now = time.monotonic()
        [event] = cluster.check(now)
        assert event.text == (f"node1 exited with {code}; its clients reconnect through nginx to node2; "
                              f"not restarting it (--restart {policy}); the others keep running")
        assert cluster.check(now + 3600) == [] and cluster.procs["node1"] is first
        assert cluster.crashed == []  # a signal or exit 0: no log to keep

        cluster.procs["node2"].signal(signal.SIGKILL)
        exited(cluster, "node2")
        [event] = cluster.check(now + 3601)
        assert "no node is left, so nginx answers 502" in event.text


def test_always_restarts_a_clean_exit_and_a_restart_that_never_gets_ready_is_reported_once(
        make_cluster: MakeCluster) -> None:
    cluster = make_cluster(restart="always")
    cluster._spawn("node1", CLEAN_EXIT)
    exited(cluster, "node1")
    now = time.monotonic()
    [event] = cluster.check(now)
    assert "exited with 0;" in event.text and "restarting it in 1 s (--restart always)" in event.text
    cluster.commands["node1"] = SLEEPER  # the next run stays up but never answers /readyz
    assert cluster.check(now + 1) == []
    assert cluster.check(now + 1 + READY_WARN - 1) == []
    [event] = cluster.check(now + 1 + READY_WARN)
    assert event.kind == "unready"
    assert event.text.startswith(f"node1 (pid {cluster.procs['node1'].pid}) is not ready 30 s after its restart")
    assert cluster.check(now + 2 + READY_WARN) == []


def test_a_restarted_node_is_reported_once_its_readyz_answers(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster()
    (tmp_path / "readyz").write_text("ok")  # a stand-in node: a static server whose GET /readyz is 200
    port = cluster.node_ports["node1"]
    cluster._spawn("node1", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tmp_path)])
    cluster.procs["node1"].signal(signal.SIGKILL)
    exited(cluster, "node1")
    now = time.monotonic()
    [event] = cluster.check(now)
    assert event.text.startswith("node1 exited with -9 (signal SIGKILL); no node is left, so nginx answers 502;")
    assert "\n" not in event.text  # killed by a signal: no log
    assert cluster.check(now + 1) == []
    restarted = cluster.procs["node1"]
    [event] = wait_until_sync(lambda: cluster.check(now + 1.5), 10, "the restarted stand-in to be ready")
    assert (event.kind, event.text) == ("restarted", f"node1 restarted (pid {restarted.pid})")
    assert cluster.check(now + 2) == []  # reported once
