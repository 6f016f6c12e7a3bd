"""The `hubnode` console script: starts, serves, drains on SIGTERM and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys

import aiohttp

from tests.helpers import Client, NodeProcess


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


def test_redis_cluster_is_refused_with_a_clear_message() -> None:
    """A --redis-url pointing at a Redis Cluster node: exit 1, one clear line, no traceback."""
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
        assert node.wait(20) == 1
        out = node.output()
        assert "cluster mode" in out and "Traceback" not in out
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
