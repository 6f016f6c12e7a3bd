"""`python -m deploy.cluster` keeps running when one of its processes dies, reports it and restarts it.

Driven the way a user drives `make cluster`: the script runs as a
subprocess, its summary (stdout) gives the nginx URL, the node ports and
PIDs, its reports come on stderr, a node is killed with `kill -9`, and
SIGINT (Ctrl-C) ends it. Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.cluster import find_executable, http_status
from tests.helpers import ROOT, SCALE, Client, missing, wait_until, wait_until_sync

CLIENTS = 6


@pytest.fixture(autouse=True)
def _needs_redis_and_nginx() -> None:
    for name in ("redis-server", "nginx"):
        try:
            find_executable(name)
        except RuntimeError as exc:
            missing(str(exc))


class Script:
    """`python -m deploy.cluster ARGS` with its stdout and stderr in files, and what its summary says."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cluster", *args],
                                         stdout=out, stderr=err, cwd=ROOT)
        wait_until_sync(lambda: "Ctrl-C stops everything." in self.stdout() or self.proc.poll() is not None,
                        30, "the cluster script to print its summary")
        assert self.proc.poll() is None, self.stdout() + self.stderr()
        text = self.stdout()
        self.url = re.findall(r"demo page\s+(http://127\.0\.0\.1:\d+)/", text)[0]
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.nodes = {m[0]: (int(m[1]), int(m[2])) for m in  # node id -> (port, pid)
                      re.findall(r"(node\d+)\s+http://127\.0\.0\.1:(\d+)\s+pid (\d+)", text)}
        self.pids = {name: int(pid) for name, pid in re.findall(r"^\s+(\w+)\s+\S+\s+pid (\d+)$", text, re.M)}
        self.redis_port = int(re.findall(r"redis\s+redis://127\.0\.0\.1:(\d+)/0", text)[0])
        self.workdir = Path(re.findall(r"logs\s+(\S+)/\*\.log", text)[0])

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def reported(self, line: str, timeout: float = 10) -> None:
        """Wait for `line` (a whole line) on the script's stderr."""
        wait_until_sync(lambda: line in self.stderr().splitlines(), timeout, f"the report {line!r}")

    def restarted_pid(self, name: str, after: int = 0, timeout: float = 20) -> int:
        """The pid in the `after`+1-th "NAME restarted (pid N)" report, once it is printed."""
        def found() -> list[str]:
            return re.findall(rf"^{name} restarted \(pid (\d+)\)$", self.stderr(), re.M)[after:]

        return int(wait_until_sync(found, timeout, f"{name} to be reported restarted")[0])

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, then its exit status once everything is stopped."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30 * SCALE)

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: stop it like Ctrl-C, then for good
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30 * SCALE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def processes(self) -> list[str]:
        """Live processes of this cluster: by process group (a child's PID) or by command line.

        Nodes carry the Redis URL in their command line and redis-server its
        address in its title; nginx's master names the working directory and
        its workers are in its process group. Zombies do not count.
        """
        markers = (f"127.0.0.1:{self.redis_port}", str(self.workdir))
        groups = set(self.pids.values()) | {int(p) for p in re.findall(r"restarted \(pid (\d+)\)", self.stderr())}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            state, _ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
            if state != "Z" and (int(pgid) in groups or any(m in cmdline for m in markers)):
                found.append(f"{entry.name}: {cmdline.strip()}")
        return found


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    scripts: list[Script] = []

    def run(*args: str) -> Script:
        (tmp_path / str(len(scripts))).mkdir()
        scripts.append(Script(tmp_path / str(len(scripts)), *args))
        return scripts[-1]

    yield run
    for script in scripts:
        script.close()


async def connect(session: aiohttp.ClientSession, url: str, users: range) -> list[Client]:
    return [await Client.open(session, f"{url}?user_id=u{i}") for i in users]


async def broadcast(session: aiohttp.ClientSession, script: Script, n: int) -> None:
    async with session.post(script.url + "/broadcast", json={"type": "marker", "data": n}) as resp:
        assert resp.status == 202, await resp.text()


async def all_get(clients: list[Client], n: int) -> None:
    frames = await asyncio.gather(*(c.recv_type("marker") for c in clients))
    assert [f["data"] for f in frames] == [n] * len(clients)


async def api(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


async def test_kill_9_of_a_node_keeps_the_cluster_up_and_the_node_comes_back(
        start: Any, session: aiohttp.ClientSession) -> None:
    """The issue's failover, in one command: kill -9 a node, its clients move, it is restarted."""
    script: Script = start("--port", "0", "--redis-port", "0", "--nodes", "2", "--", "--heartbeat", "0.5")
    assert set(script.nodes) == {"node1", "node2"}
    assert len(script.processes()) >= 4, script.processes()  # the leftover check below can see them

    clients = await connect(session, script.ws_url, range(CLIENTS))
    spread = Counter(c.connected["node"] for c in clients)
    assert set(spread) == {"node1", "node2"}, spread
    victims = [c for c in clients if c.connected["node"] == "node2"]
    bystanders = [c for c in clients if c.connected["node"] == "node1"]
    port2, pid2 = script.nodes["node2"]

    os.kill(pid2, signal.SIGKILL)
    await asyncio.gather(*(c.closed_with() for c in victims))  # their connections drop
    moved = await connect(session, script.ws_url, range(100, 100 + len(victims)))  # they reconnect at once
    assert [c.connected["node"] for c in moved] == ["node1"] * len(victims)
    script.reported("node2 exited with -9 (signal SIGKILL); its clients reconnect through nginx to node1; "
                    "restarting it in 1 s (--restart on-failure)")
    assert script.proc.poll() is None, script.stderr()

    await broadcast(session, script, 1)  # the moved clients are full members on node1
    await all_get(bystanders + moved, 1)

    # node2 comes back: same port, same id, registered in Redis again, serving
    new_pid = script.restarted_pid("node2")
    assert new_pid != pid2 and not gone(new_pid)
    assert http_status(f"http://127.0.0.1:{port2}/readyz") == 200

    async def both_registered() -> bool:
        stats = await api(session, script.url + "/api/stats")
        nodes = await api(session, script.url + "/api/nodes")
        return bool(stats["nodes"] == 2 and {n["id"] for n in nodes["nodes"]} == {"node1", "node2"})

    await wait_until(both_registered, 10, what="/api/stats to count 2 nodes again")
    [direct] = await connect(session, f"ws://127.0.0.1:{port2}/ws", range(200, 201))
    assert direct.connected["node"] == "node2"
    await broadcast(session, script, 2)
    await all_get(bystanders + moved + [direct], 2)
    await direct.close()

    # it dies again: reported again (2 s when within 10 s of its restart, which a slow run may pass:
    # the doubling itself is tested with a fake clock in tests/unit/test_cluster_restart.py)
    os.kill(new_pid, signal.SIGKILL)
    wait_until_sync(lambda: re.search(r"^node2 exited with -9 \(signal SIGKILL\); its clients reconnect through "
                                      r"nginx to node1; restarting it in [12] s \(--restart on-failure\)$",
                                      script.stderr(), re.M), 10, "node2's second death to be reported")

    # nginx too: its workers outlive a killed master and hold the port, so they must go for a restart
    await asyncio.gather(*(c.close() for c in clients + moved))
    os.kill(script.pids["nginx"], signal.SIGKILL)
    script.reported(f"nginx exited with -9 (signal SIGKILL); its clients are cut off and nothing answers on "
                    f"{script.url} (the nodes keep their own ports); restarting it in 1 s (--restart on-failure)")
    nginx_pid = script.restarted_pid("nginx")
    assert (await api(session, script.url + "/api/stats"))["nodes"] >= 1
    assert not gone(nginx_pid)

    assert script.interrupt() == 0, script.stderr()
    assert "stopping..." in script.stderr()
    leftovers = script.processes()
    assert not leftovers, leftovers
    assert not [p for p in (*script.pids.values(), new_pid, nginx_pid) if not gone(p)]
    assert not script.workdir.exists()  # no crash (signals only): the logs go


async def test_restart_no_leaves_the_node_down_and_the_rest_serving(
        start: Any, session: aiohttp.ClientSession) -> None:
    """--restart no: the killed node stays down, nginx sends everyone to the other; with no node left, 502."""
    script: Script = start("--port", "0", "--redis-port", "0", "--nodes", "2", "--restart", "no",
                           "--", "--heartbeat", "0.5")
    clients = await connect(session, script.ws_url, range(4))
    victims = [c for c in clients if c.connected["node"] == "node2"]
    assert victims
    port2, pid2 = script.nodes["node2"]
    os.kill(pid2, signal.SIGKILL)
    await asyncio.gather(*(c.closed_with() for c in victims))
    moved = await connect(session, script.ws_url, range(100, 100 + len(victims)))
    assert {c.connected["node"] for c in moved} == {"node1"}
    script.reported("node2 exited with -9 (signal SIGKILL); its clients reconnect through nginx to node1; "
                    "not restarting it (--restart no); the others keep running")

    # node1 sweeps node2 out of Redis (4 heartbeats) and nothing brings it back
    async def one_node() -> bool:
        return bool((await api(session, script.url + "/api/stats"))["nodes"] == 1)

    await wait_until(one_node, 10, what="the dead node2 to be swept")
    assert http_status(f"http://127.0.0.1:{port2}/readyz") is None
    await broadcast(session, script, 1)
    await all_get([c for c in clients if c not in victims] + moved, 1)
    await asyncio.gather(*(c.close() for c in clients + moved))

    # the last node dies: the script still runs, says so, and nginx answers 502
    os.kill(script.nodes["node1"][1], signal.SIGKILL)
    script.reported("node1 exited with -9 (signal SIGKILL); no node is left, so nginx answers 502; "
                    "not restarting it (--restart no); the others keep running")
    async with session.get(script.url + "/api/stats") as resp:
        assert resp.status == 502
    assert script.proc.poll() is None

    assert script.interrupt() == 0, script.stderr()
    assert "restarted" not in script.stderr()
    assert not script.processes()


@pytest.mark.parametrize("flag", ["--redis-port", "--port"])
def test_a_port_in_use_stops_the_script_at_once_with_one_line(flag: str) -> None:
    """The fixed Redis port (6380 by default) or nginx's port taken: one line saying how to pick another."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--port" if flag == "--redis-port" else "--redis-port"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "deploy.cluster", flag, str(port), other, "0"],
                              capture_output=True, text=True, cwd=ROOT, timeout=20 * SCALE)
        took = time.monotonic() - started
    assert done.returncode != 0 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert f"127.0.0.1:{port} is already in use" in line, line
    assert f'make cluster CLUSTER_ARGS="{flag} 0"' in line, line
    assert took < 5 * SCALE, took
