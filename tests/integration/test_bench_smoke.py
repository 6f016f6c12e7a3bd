"""Smoke test of the benchmark harness (bench/) against hubnode only, with the Python client."""

from __future__ import annotations

from pathlib import Path

from bench.scenarios import Context, fanout
from bench.systems import HubSystem


async def test_bench_fanout_delivers_everything(tmp_path: Path) -> None:
    """A 400-delivery fan-out through the bench harness arrives complete, without duplicates."""
    ctx = Context(log_dir=tmp_path, client="python", client_processes=1, timeout=60)
    result = await fanout(HubSystem(), ctx, clients=20, messages=20)
    assert (result["delivered"], result["missing"], result["duplicated"]) == (400, 0, 0), result
