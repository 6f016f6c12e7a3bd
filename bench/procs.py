"""Processes the benchmark starts, and what /proc says about them.

Everything listens on loopback and is stopped by the harness itself: every
child is started in its own process group and ended by its pid, never by name.
CPU is utime+stime from /proc/<pid>/stat; memory is VmRSS from
/proc/<pid>/status.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLK_TCK", "Cpu", "Proc", "RedisServer", "background_load", "cpu_of", "free_port",
    "machine_busy", "nofile_limit", "rss_of", "wait_for",
]

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds a process has used so far, split into user and kernel time."""

    user: float = 0.0
    system: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.system

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.system + other.system)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)


def cpu_of(pid: int) -> Cpu:
    """utime+stime of `pid` (its threads included), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return Cpu(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK)


def machine_busy() -> float:
    """CPU-seconds all cores spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy over the next `seconds` (call it while the benchmark runs nothing)."""
    before = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - before) / seconds


def rss_of(pid: int) -> int:
    """Resident set size of `pid` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nofile_limit() -> int:
    """The hard RLIMIT_NOFILE: the most sockets one process may hold here."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _raise_nofile() -> None:
    """preexec_fn: lift the soft open-files limit to the hard one (many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.setpgrp()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` until truthy; raise after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None, stdin: int | None = None,
                 stdout: int | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            self.argv, stdin=stdin, stdout=stdout if stdout is not None else self._log,
            stderr=self._log, env={**os.environ, **(env or {})}, cwd=ROOT,
            preexec_fn=_raise_nofile)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def cpu(self) -> Cpu:
        return cpu_of(self.pid)

    def rss(self) -> int:
        return rss_of(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only this process."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


class RedisServer:
    """A private redis-server on a free loopback port, no persistence."""

    def __init__(self, log_dir: Path, name: str = "redis") -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hub-bench-redis-")
        self.proc = Proc(name, [exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", self.dir,
                                "--maxmemory-policy", "noeviction", "--maxclients", "1000"],
                         log_dir)
        wait_for(lambda: port_open(self.port), 10, "redis-server to listen")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def python() -> str:
    return sys.executable
