"""docs/redis.md's examples run as written: the publishers in other languages, and the redis-cli session.

Every snippet publishes `order_shipped` to the room `orders` through the
publish script that `hubctl script publish` writes out, and prints how many
nodes took it. Each test checks the same things: the program's own line, and
that a member of the room gets the message with `room` filled in (issue 12),
and with the next offset and the stream's epoch, since the node keeps history
and the member's join created the room's stream (issue 13).

Node.js's packages are pinned in tests/e2e/node_publisher/package-lock.json
and installed on first use; Ruby's gems are Debian packages (`make sysdeps`).
Go's modules come from the Go module proxy, which not every machine reaches:
that test runs where `go` is on PATH and the modules download, and skips
with the reason otherwise.

The redis-cli session is replayed against the state it describes (two real
nodes, the same clients), so the key names, types and fields it shows cannot
drift from what the nodes write.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from publisher.aio import AsyncPublisher
from tests.helpers import Client, NodeProcess, RedisServer, doc_block, missing, start_all

PAGE = "docs/redis.md"
PACKAGES = Path(__file__).with_name("node_publisher")
RUBY_CHECK = 'require "redis"; require "msgpack"'


def clean_env() -> dict[str, str]:
    """The environment without HUB_* variables: the snippets must work on their defaults (prefix "hub:")."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}


def write_publish_script(folder: Path) -> None:
    """What every snippet's first line says: `hubctl script publish > publish.lua`."""
    hubctl = Path(sys.executable).with_name("hubctl")
    with (folder / "publish.lua").open("w") as out:
        subprocess.run([str(hubctl), "script", "publish"], stdout=out, env=clean_env(), check=True, timeout=30)


async def publishes_to_the_room(session: aiohttp.ClientSession, redis_server: RedisServer, node_id: str,
                                command: list[str], cwd: Path) -> None:
    """Run `command` in `cwd` while a member is in `orders` on a real node; check what the member gets."""
    node = NodeProcess("--redis-url", redis_server.url, "--node-id", node_id, "--history-size", "10").start()
    try:
        member = await Client.open(session, node.ws_url + "?user_id=ops1")
        ack = await member.request("join_room", "orders")
        assert ack["type"] == "ack" and ack["data"]["offset"] == 0, ack
        ran = subprocess.run(command, cwd=cwd, env=clean_env() | {"HUB_REDIS_URL": redis_server.url},
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "1 node(s) took it"
        got = await member.recv_type("order_shipped")
        assert got["room"] == "orders" and got["data"] == {"order": 42} and "user_id" not in got
        # the join created the room's stream (the node keeps history): the script appended to it
        assert (got["offset"], got["epoch"]) == (1, ack["data"]["epoch"])
        await member.close()
    finally:
        node.stop()


def node_modules() -> Path:
    """The Node.js example's packages, installed from the lock file when missing (idempotent)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        missing("node and npm are not installed: run `make sysdeps` (Debian: apt-get install nodejs npm)")
    if not (PACKAGES / "node_modules" / "redis").exists() or not (PACKAGES / "node_modules" / "@msgpack").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=PACKAGES, check=True, timeout=300)
    return PACKAGES / "node_modules"


async def test_node_snippet_reaches_the_room_with_its_name_and_offset(
        tmp_path: Path, session: aiohttp.ClientSession, own_redis: RedisServer) -> None:
    modules = node_modules()
    (tmp_path / "publish.mjs").write_text(doc_block(PAGE, "// publish.mjs"))
    (tmp_path / "node_modules").symlink_to(modules, target_is_directory=True)
    write_publish_script(tmp_path)
    await publishes_to_the_room(session, own_redis, "js", ["node", "publish.mjs"], tmp_path)


async def test_ruby_snippet_reaches_the_room_with_its_name_and_offset(
        tmp_path: Path, session: aiohttp.ClientSession, own_redis: RedisServer) -> None:
    ruby = shutil.which("ruby")
    if ruby is None or subprocess.run([ruby, "-e", RUBY_CHECK], capture_output=True, timeout=60).returncode:
        missing("ruby with the redis and msgpack gems is not installed: run `make sysdeps` "
                "(Debian: apt-get install ruby ruby-redis ruby-msgpack)")
    (tmp_path / "publish.rb").write_text(doc_block(PAGE, "# publish.rb"))
    write_publish_script(tmp_path)
    await publishes_to_the_room(session, own_redis, "rb", [ruby, "publish.rb"], tmp_path)


def go_program(folder: Path) -> list[str]:
    """A module with the Go snippet and its dependencies, as the snippet's first lines say; skips without Go.

    `go` is not installed by `make sysdeps` and its modules come from the Go
    module proxy, so a machine without either skips (plain pytest.skip, not
    `missing`: `make test` must not fail for a toolchain it does not install).
    """
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not on PATH: the Go snippet of docs/redis.md is not run on this machine")
    (folder / "publish.go").write_text(doc_block(PAGE, "// publish.go"))
    env = clean_env()
    subprocess.run([go, "mod", "init", "publish"], cwd=folder, env=env, check=True, capture_output=True, timeout=60)
    tidy = subprocess.run([go, "mod", "tidy"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    if tidy.returncode:
        last = (tidy.stderr.strip().splitlines() or ["go mod tidy failed"])[-1].strip()
        pytest.skip(f"the Go modules of docs/redis.md's Go snippet (go-redis v9, msgpack v5) could not be "
                    f"downloaded: {last}")
    built = subprocess.run([go, "build", "-o", "publish", "."], cwd=folder, env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    return [str(folder / "publish")]


async def test_go_snippet_reaches_the_room_with_its_name_and_offset(
        tmp_path: Path, session: aiohttp.ClientSession, own_redis: RedisServer) -> None:
    command = go_program(tmp_path)
    write_publish_script(tmp_path)
    await publishes_to_the_room(session, own_redis, "go", command, tmp_path)


# -- the redis-cli session ------------------------------------------------------------------

def session_steps(block: str) -> list[tuple[list[str], list[str]]]:
    """(redis-cli arguments, expected output lines) of each `$ redis-cli ...` command of a console block."""
    steps: list[tuple[list[str], list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            command = shlex.split(line[2:].split("  #")[0])
            assert command[0] == "redis-cli", line
            steps.append((command[1:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def volatile(lines: list[str]) -> list[str]:
    """Output lines without their reply numbering, with times, addresses, versions and epochs made constant."""
    out = []
    for line in lines:
        line = re.sub(r"^\s*\d+\) ", "", line)
        line = re.sub(r"127\.0\.0\.1:\d+", "<address>", line)
        line = re.sub(r"\b\d+\.\d+\.\d+\b", "<version>", line)
        line = re.sub(r"\b\d{10,}\b", "<time>", line)
        out.append(re.sub(r"\b[0-9a-f]{10}\b", "<epoch>", line))
    return out


def comparable(args: list[str], lines: list[str]) -> object:
    """What must match: hashes and scored sets as sorted pairs, sets sorted (Redis orders neither), else the lines."""
    name = args[0].upper()
    if name == "HGETALL" or (name == "ZRANGE" and "WITHSCORES" in args):
        return sorted(zip(lines[::2], lines[1::2], strict=True))
    if name == "SMEMBERS":
        return sorted(lines)
    return lines


async def test_redis_cli_session_shows_what_two_nodes_write(session: aiohttp.ClientSession,
                                                             own_redis: RedisServer) -> None:
    if shutil.which("redis-cli") is None:
        missing("redis-cli is not installed: run `make sysdeps` (Debian: apt-get install redis-tools)")
    block = doc_block(PAGE, "$ redis-cli ZRANGE hub:nodes")
    flags = ("--redis-url", own_redis.url, "--history-size", "100", "--presence-rooms", "*")
    nodes = [NodeProcess(*flags, "--node-id", "web-1"), NodeProcess(*flags, "--node-id", "web-2")]
    start_all(nodes)
    try:
        clients = []  # as the page says: alice on each node, an anonymous client on web-1, bob on web-2
        for node, query in ((nodes[0], "?user_id=alice"), (nodes[0], ""), (nodes[1], "?user_id=bob"),
                            (nodes[1], "?user_id=alice")):
            client = await Client.open(session, node.ws_url + query)
            await client.join("lobby")
            clients.append(client)
        await clients[2].join("orders")
        async with AsyncPublisher(own_redis.url) as publisher:
            assert await publisher.broadcast_to_room("lobby", {"type": "notice", "data": "deploy at 18:00"}) == 2
        for args, expected in session_steps(block):
            ran = subprocess.run(["redis-cli", "-p", str(own_redis.port), "--no-raw", *args], capture_output=True,
                                 text=True, timeout=30, check=True)
            got = ran.stdout.splitlines()
            if args[0].upper() == "TTL":  # seconds left of the stream's 300
                assert 0 < int(got[0].removeprefix("(integer) ")) <= 300, got
                continue
            assert comparable(args, volatile(got)) == comparable(args, volatile(expected)), (args, got)
        for client in clients:
            await client.close()
    finally:
        for node in nodes:
            node.stop()
