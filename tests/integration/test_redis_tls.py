"""hubnode, Publisher, AsyncPublisher and hubctl on a Redis that speaks TLS only (docs/redis.md:
`rediss://` with `--redis-ca`, `--redis-cert`, `--redis-key`).

The session's `redis_tls` listens on TLS alone, so anything that works
against it went over TLS. A CA that did not sign the server's certificate is
a configuration mistake: one line on stderr, exit 2, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from deploy.redis_servers import RedisProcess, TlsFiles, free_port
from publisher import AsyncPublisher, Publisher
from publisher.topology import TopologyError
from tests.helpers import Client, NodeProcess

PREFIX = "tls:"
BIN = Path(sys.executable).parent  # the venv's console scripts, hubnode and hubctl


def tls_flags(files: TlsFiles, ca: Path | None = None) -> list[str]:
    return ["--redis-ca", str(ca or files.ca_cert), "--redis-cert", str(files.client_cert),
            "--redis-key", str(files.client_key)]


@pytest.fixture(scope="module")
def node(redis_tls: RedisProcess, tls_files: TlsFiles) -> Iterator[NodeProcess]:
    """One node whose commands, membership and subscriber all go over TLS."""
    started = NodeProcess("--redis-url", redis_tls.url, *tls_flags(tls_files), "--key-prefix", PREFIX,
                          "--node-id", "tls1", "--unsubscribe-grace", "0.2").start()
    yield started
    started.stop()


def run(program: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A console script of the venv, to its end (a node that wrongly starts serving fails by timeout)."""
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def assert_one_line_error(done: subprocess.CompletedProcess[str], program: str, status: int, *parts: str) -> None:
    """Exit `status`, nothing on stdout, one line on stderr that starts `<program>: error:` and says `parts`."""
    assert done.returncode == status, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for part in parts:
        assert part in lines[0], (part, lines[0])


async def test_node_publishers_and_hubctl_deliver_over_tls(
        node: NodeProcess, redis_tls: RedisProcess, tls_files: TlsFiles, session: aiohttp.ClientSession) -> None:
    """Over TLS only: a client registers and joins through the node, and a message from the node itself
    (a client's room message), from Publisher, from AsyncPublisher and from `hubctl publish` (TLS files
    given as flags, then as HUB_REDIS_* variables) each reaches it through the node's subscriber;
    `hubctl members` lists it."""
    url = redis_tls.url
    files = {"redis_ca": str(tls_files.ca_cert), "redis_cert": str(tls_files.client_cert),
             "redis_key": str(tls_files.client_key)}
    client = await Client.open(session, f"{node.ws_url}?user_id=tls-user")
    await client.join("secure")
    await client.send({"type": "room_message", "data": {"room": "secure", "message": "from a client"}})
    assert (await client.recv_type("room_message"))["data"]["message"] == "from a client"
    with Publisher(url, key_prefix=PREFIX, **files) as pub:
        assert pub.broadcast_to_room("secure", {"type": "sync", "data": 1}) == 1
    assert (await client.recv())["type"] == "sync"
    async with AsyncPublisher(url, key_prefix=PREFIX, **files) as apub:
        assert await apub.broadcast_to_user("tls-user", {"type": "async", "data": 2}) == 1
    assert (await client.recv())["type"] == "async"
    published = run("hubctl", "--redis-url", url, *tls_flags(tls_files), "--key-prefix", PREFIX, "--json",
                    "publish", "--room", "secure", "--type", "hubctl", "--data", "3")
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["nodes"] == 1
    assert ((await client.recv())["type"], published.stderr) == ("hubctl", "")
    from_env = {"HUB_REDIS_CA": files["redis_ca"], "HUB_REDIS_CERT": files["redis_cert"],
                "HUB_REDIS_KEY": files["redis_key"]}
    members = run("hubctl", "--redis-url", url, "--key-prefix", PREFIX, "--json", "members", "secure", env=from_env)
    assert members.returncode == 0, members.stderr
    assert json.loads(members.stdout)["members"] == [{"conn_id": client.conn_id, "user_id": "tls-user",
                                                       "node": "tls1"}]
    await client.expect_silence()


def test_wrong_ca_stops_hubnode_with_one_line(redis_tls: RedisProcess, tls_files: TlsFiles) -> None:
    """A node trusting an unrelated CA exits 2 at once with `hubnode: error: --redis-url '…': TLS handshake
    with Redis failed: …`, one line, no traceback."""
    done = run("hubnode", "--host", "127.0.0.1", "--port", str(free_port()), "--redis-url", redis_tls.url,
               *tls_flags(tls_files, ca=tls_files.wrong_ca_cert))
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{redis_tls.url}':", "TLS handshake with Redis failed",
                          "certificate")


def test_wrong_ca_stops_hubctl_and_the_publisher_with_one_line(redis_tls: RedisProcess, tls_files: TlsFiles) -> None:
    """hubctl trusting an unrelated CA exits 2 with one `hubctl: error: TLS handshake …` line, no traceback;
    Publisher raises TopologyError saying the same."""
    done = run("hubctl", "--redis-url", redis_tls.url, *tls_flags(tls_files, ca=tls_files.wrong_ca_cert), "stats")
    assert_one_line_error(done, "hubctl", 2, "TLS handshake with Redis failed", "certificate")
    with Publisher(redis_tls.url, redis_ca=str(tls_files.wrong_ca_cert)) as pub:
        with pytest.raises(TopologyError, match="TLS handshake with Redis failed"):
            pub.stats()
