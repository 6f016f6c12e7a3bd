"""`python -m bench --profile`: where a hubnode node spends its CPU under load.

py-spy samples every node during a fan-out and a point-to-point run (a separate
run: sampling slows the node, so these runs give no figures). The raw stacks are
summed into self time per function, where a function's "self" time includes the
C code and system calls it makes (transport.write shows up as its Python
caller); a flame graph per node is written next to them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from bench.scenarios import Context, fanout, point_to_point
from bench.systems import Deployment, HubSystem

__all__ = ["profile_hub", "summarise"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(__file__).resolve().parent.parent / ".venv/bin/py-spy")
    if not Path(exe).exists():
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return exe


class Spy:
    """py-spy attached to every node of a deployment while a window is open."""

    def __init__(self, out: Path, name: str, rate: int = 400) -> None:
        self.out, self.name, self.rate = out, name, rate
        self.procs: list[asyncio.subprocess.Process] = []
        self.files: list[Path] = []

    async def start(self, dep: Deployment) -> None:
        for k, pid in enumerate(dep.node_pids):
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                path = self.out / f"profile-{self.name}-node{k}.{suffix}"
                self.procs.append(await asyncio.create_subprocess_exec(
                    _py_spy(), "record", "--pid", str(pid), "--rate", str(self.rate),
                    "--format", fmt, "--output", str(path), "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
                if fmt == "raw":
                    self.files.append(path)
        await asyncio.sleep(1.0)  # py-spy needs a moment to attach

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def summarise(paths: list[Path], top: int = 14) -> tuple[int, list[tuple[str, int]]]:
    """(samples, [(function, self samples)]) summed over py-spy raw files."""
    own: Counter[str] = Counter()
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = stack.split(";")[-1]
            match = _FRAME.match(leaf)
            name = f"{match['func']} ({match['file']})" if match else leaf
            if match and match["func"] == "Runner.run":
                # no Python frame above the loop: uvloop's own C code (epoll, socket reads)
                name = "event loop itself (uvloop C code: epoll, reads, callbacks)"
            own[name] += int(count)
            total += int(count)
    return total, own.most_common(top)


async def profile_hub(ctx: Context, out: Path) -> list[str]:
    """Profile hubnode under fan-out (1k clients, 1M deliveries) and point-to-point (100k)."""
    system = HubSystem()
    lines = ["py-spy (`python -m bench --profile`, sampling at 400 Hz, not paused) over "
             "both nodes; self time per function, the C code and system calls it makes "
             "included. Flame graphs: `bench/out/profile-*.svg`.", ""]
    runs: list[tuple[str, Any]] = [
        ("fanout", lambda spy: fanout(system, ctx, 1000, 1000, probe=spy)),
        ("p2p", lambda spy: point_to_point(system, ctx, 2000, 100_000, probe=spy)),
    ]
    for name, run in runs:
        spy = Spy(out, name)
        result = await run(spy)
        samples, rows = summarise(spy.files)
        lines += [f"### {name}: {result['delivered']:,} deliveries, {samples:,} samples "
                  f"(server CPU {result['server_user_s']:.2f} s user + "
                  f"{result['server_sys_s']:.2f} s kernel)", "",
                  "| function | self % |", "|---|---|"]
        lines += [f"| `{fn}` | {n / max(1, samples) * 100:.1f} |" for fn, n in rows]
        lines.append("")
    return lines
