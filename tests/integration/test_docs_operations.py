"""docs/operations.md against the code: its metrics table is what /metrics exports, and its topology
error is what `hubnode` prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from hubnode.app import NODE
from tests.helpers import ROOT, SCALE, Client, RedisServer, doc_block, wait_until

PAGE = "docs/operations.md"
HEADER = "| metric | type | labels | meaning |"

Exported = dict[str, tuple[str, frozenset[str]]]
"""Metric name as users query it (counters with `_total`) -> (type, label names seen in its samples)."""


def documented_metrics() -> Exported:
    """The rows of the page's metrics table: `name` | type | `label`, … | meaning."""
    text = (ROOT / PAGE).read_text()
    start = text.index(HEADER + "\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    table: Exported = {}
    for name, kind, labels, _meaning in rows:
        table[name.strip("`")] = (kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
    return table


async def exported_metrics(session: aiohttp.ClientSession, hub: TestServer) -> Exported:
    text = await (await session.get(hub.make_url("/metrics"))).text()
    found: Exported = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(label for sample in family.samples for label in sample.labels)
        found[name] = (family.type, labels)
    return found


async def crash_once() -> None:
    raise RuntimeError("a supervised task that crashes, for the task label")


async def test_metrics_table_lists_every_metric_the_node_exports(
        hub: TestServer, session: aiohttp.ClientSession) -> None:
    """Every family of /metrics is a row with its type and labels, and every row is a family.

    Traffic first, so that the labelled counters have samples to show their labels: frames by type,
    an error by code, a control command by op (over the HTTP API) and a crash of a supervised task.
    """
    alice = await Client.open(session, str(hub.make_url("/ws")) + "?user_id=alice")
    await alice.join("lobby")
    await alice.ws.send_str("not json")
    await alice.recv_type("error")
    resp = await session.post(hub.make_url("/api/users/alice/disconnect"), json={"reason": "docs"})
    assert resp.status == 200, await resp.text()
    hub.app[NODE].supervisor.spawn("docs-check", crash_once)

    async def labelled() -> Exported | None:
        found = await exported_metrics(session, hub)
        wanted = ("hubnode_client_frames_total", "hubnode_client_errors_total",
                  "hubnode_control_commands_total", "hubnode_task_crashes_total")
        return found if all(found[name][1] for name in wanted) else None

    exported = await wait_until(labelled, timeout=10, what="a sample of every labelled counter")
    # prometheus-client exports a histogram's creation time as a gauge family of its own
    created = {name for name in exported if name.endswith("_created")
               and exported.get(name.removesuffix("_created"), ("",))[0] == "histogram"}
    assert created and all(name in (ROOT / PAGE).read_text() for name in created)
    exported = {name: value for name, value in exported.items() if name not in created}
    documented = documented_metrics()
    assert sorted(documented) == sorted(exported), "docs/operations.md's metrics table and /metrics differ"
    for name, (kind, labels) in exported.items():
        assert documented[name] == (kind, labels), (name, documented[name], (kind, labels))


def test_topology_error_example_is_what_hubnode_prints(redis_server: RedisServer) -> None:
    """The page's wrong-topology session, against a real Redis that is not a cluster: the same line, exit 2."""
    command, expected = doc_block(PAGE, "$ hubnode --redis-url redis+cluster://").splitlines()
    port = str(redis_server.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = subprocess.run(command[2:].replace("6379", port), shell=True, env=env, capture_output=True, text=True,
                         timeout=30 * SCALE)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr == expected.replace("6379", port) + "\n"
