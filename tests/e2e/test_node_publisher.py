"""The README's Node.js publishing example, run as written with Node.js against a real node.

Issue 12: its messages to a room arrived without `room` (the Python
publisher's had it). Issue 13: it publishes through the history script that
`hubctl script publish` writes out, so its messages get offsets. The packages
are those the README names, pinned in tests/e2e/node_publisher/package-lock.json
and installed on first use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.helpers import Client, NodeProcess, RedisServer, missing
from tests.integration.test_packaging import readme_block

PACKAGES = Path(__file__).with_name("node_publisher")


def node_modules() -> Path:
    """The example's packages, installed from the lock file when missing (idempotent)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        missing("node and npm are not installed: run `make sysdeps` (Debian: apt-get install nodejs npm)")
    if not (PACKAGES / "node_modules" / "redis").exists() or not (PACKAGES / "node_modules" / "@msgpack").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=PACKAGES, check=True, timeout=300)
    return PACKAGES / "node_modules"


async def test_readme_node_example_reaches_the_room_with_its_name(tmp_path: Path,
                                                                  session: aiohttp.ClientSession) -> None:
    modules = node_modules()
    (tmp_path / "publish.mjs").write_text(readme_block("// publish.mjs"))
    (tmp_path / "node_modules").symlink_to(modules, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    hubctl = Path(sys.executable).with_name("hubctl")
    with (tmp_path / "publish.lua").open("w") as out:  # as the README says: hubctl script publish > publish.lua
        subprocess.run([str(hubctl), "script", "publish"], stdout=out, env=env, check=True, timeout=30)
    redis_server = RedisServer()
    redis_server.start()  # the example uses the default prefix "hub:"
    node = NodeProcess("--redis-url", redis_server.url, "--node-id", "js", "--history-size", "10").start()
    try:
        member = await Client.open(session, node.ws_url + "?user_id=ops1")
        ack = await member.request("join_room", "orders")
        env |= {"HUB_REDIS_URL": redis_server.url}
        ran = subprocess.run(["node", "publish.mjs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "1 node(s) took it"
        got = await member.recv_type("order_shipped")
        assert got["room"] == "orders" and got["data"] == {"order": 42} and "user_id" not in got
        # the join created the room's stream (the node keeps history): the script appended to it
        assert (got["offset"], got["epoch"]) == (1, ack["data"]["epoch"])
    finally:
        node.stop()
        redis_server.stop()
