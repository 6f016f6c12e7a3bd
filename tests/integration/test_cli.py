"""The `hubnode` console script: starts, serves, drains on SIGTERM and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import aiohttp

from tests.helpers import Client, NodeProcess, wait_until_sync


async def test_sigterm_drains_and_exits_zero(session: aiohttp.ClientSession) -> None:
    """Clients get a reconnect system message then close 1001; the process exits 0."""
    node = NodeProcess("--node-id", "cli1").start()
    try:
        assert (await session.get(f"{node.url}/healthz")).status == 200
        clients = [await Client.open(session, f"{node.ws_url}?user_id=u{i}") for i in range(3)]
        await clients[0].join("r")
        node.signal(signal.SIGTERM)
        for client in clients:
            msg = await client.recv_type("system_message")
            assert msg["data"] == {"event": "reconnect"}
            assert await client.closed_with() == 1001
        assert node.wait(15) == 0
        assert "listening on http://127.0.0.1" in node.output()
    finally:
        node.stop()


async def test_sigint_also_drains() -> None:
    """SIGINT (Ctrl-C) drains like SIGTERM and exits 0."""
    node = NodeProcess().start()
    try:
        node.signal(signal.SIGINT)
        assert node.wait(15) == 0
    finally:
        node.stop()


def test_refuses_public_address_without_allow_anonymous() -> None:
    """auth none on a non-loopback address exits non-zero with a clear message."""
    out = subprocess.run([sys.executable, "-m", "hubnode.cli", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "--allow-anonymous" in out.stderr and "Traceback" not in out.stderr


def test_environment_variables_configure_the_node() -> None:
    """HUB_* variables are read like flags (here a bad HUB_AUTH is refused)."""
    out = subprocess.run([sys.executable, "-m", "hubnode.cli"], capture_output=True, text=True,
                         timeout=30, env={"HUB_AUTH": "ldap", "PATH": "/usr/bin"})
    assert out.returncode == 2 and "ldap" in out.stderr


async def test_node_id_from_environment(session: aiohttp.ClientSession) -> None:
    """HUB_NODE_ID names the node when no flag is given."""
    node = NodeProcess(env={"HUB_NODE_ID": "envnode"}).start()
    try:
        got = await (await session.get(f"{node.url}/healthz")).json()
        assert got["node"] == "envnode"
    finally:
        node.stop()


def test_a_redis_cluster_without_slots_is_refused_with_a_clear_message() -> None:
    """A --redis-url naming a cluster-mode Redis that serves no slot yet: exit 2, one clear line, no traceback."""
    import tempfile

    from tests.helpers import RedisServer, free_port

    folder = tempfile.mkdtemp(prefix="hub-cluster-")
    port = free_port()
    while port + 10000 > 65535 or not _free(port + 10000):  # the cluster bus listens on port + 10000
        port = free_port()
    server = RedisServer(port, extra=("--cluster-enabled", "yes", "--cluster-config-file", f"{folder}/nodes.conf"))
    server.start()
    try:
        node = NodeProcess("--redis-url", server.url, "--node-id", "c1")
        node.start(wait=False)
        assert node.wait(20) == 2
        out = node.output()
        assert out.count("\n") == 1 and "Traceback" not in out, out
        assert out.startswith("hubnode: error: --redis-url") and "0 of 16384 slots are assigned" in out, out
    finally:
        server.stop()


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


USER_COMMANDS = [  # issue 12: what a user typed, and got a traceback or a lie for
    (["--redis-url", "redis+sentinel://x"], {}, "--redis-url"),
    (["--redis-url", "http://x"], {}, "--redis-url"),
    ([], {"HUB_REDIS_URL": "http://x"}, "HUB_REDIS_URL"),
    ([], {"HUB_REDIS_URL": "redis+sentinel://x"}, "HUB_REDIS_URL"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--port", "99999"], {}, "--port"),
    ([], {"HUB_PORT": "-1"}, "HUB_PORT"),
]


def test_bad_configuration_is_one_line_from_the_console_script() -> None:
    """The real process: exit 2, one line naming the flag or variable, no traceback, nothing started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    for argv, extra, source in USER_COMMANDS:
        out = subprocess.run([sys.executable, "-m", "hubnode.cli", *argv], capture_output=True, text=True,
                             timeout=30, env={**env, **extra})
        assert out.returncode == 2, (argv, extra, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"hubnode: error: {source}"), (argv, extra, out.stderr)
        assert "listening" not in out.stderr and out.stdout == ""


async def test_port_zero_logs_the_port_it_bound(session: aiohttp.ClientSession) -> None:
    """`--port 0` takes a free port, and the log line names that port, which then answers."""
    node = NodeProcess("--port", "0", "--node-id", "anyport")
    node.start(wait=False)
    try:
        wait_until_sync(lambda: "listening on" in node.output(), 15, "the listening line")
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", node.output())
        assert found and found[1] != "0", node.output()
        assert (await session.get(f"http://127.0.0.1:{found[1]}/healthz")).status == 200
    finally:
        node.stop()
