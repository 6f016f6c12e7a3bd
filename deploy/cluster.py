"""A real local cluster without Docker: redis-server, N hubnode nodes and nginx in front.

    python -m deploy.cluster [--port 8080] [--redis-port P] [--nodes 3] [--keep] [-- NODE FLAGS...]

This is what `make cluster` runs, and what tests/e2e/test_cluster_nginx.py
boots on free ports. Everything runs as the current user from the venv:
redis-server without persistence, `hubnode --node-id node1..N` on loopback
ports, and nginx (the Debian package's binary) with deploy/nginx.conf
rendered for those ports, in the foreground (`daemon off;`) with its pid
file, temporary files and the cluster's logs in one working directory.

Each child runs in its own process group, so a Ctrl-C in the terminal
reaches this script only; it then stops what it started, by PID and in
order: the nodes first (SIGTERM: they drain, clients get close 1001 and
reconnect), then nginx, then Redis. Children also get SIGTERM if this script
dies without cleaning up (Linux parent-death signal).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["Cluster", "ClusterError", "find_executable", "main", "nginx_command", "render_nginx_conf"]

NGINX_TEMPLATE = Path(__file__).with_name("nginx.conf")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/usr/bin", "/usr/local/bin")
_LISTEN = re.compile(r"(# cluster\.py: listen address\n)([ \t]*)listen [^;\n]+;")
_SERVERS = re.compile(r"(# cluster\.py: upstream servers[^\n]*\n)([ \t]*)server [^;\n]+;\n(?:[ \t]*server [^;\n]+;\n)*")
_SERVER_OPTIONS = "max_fails=1 fail_timeout=5s"


class ClusterError(RuntimeError):
    """The cluster could not start or a process died; the message says which and shows its log."""


# -- pure helpers ----------------------------------------------------------------

def render_nginx_conf(template: str, listen: str, servers: Sequence[str]) -> str:
    """deploy/nginx.conf with its listen address and upstream servers replaced.

    Only the lines after the two `# cluster.py:` markers change; a template
    without them (edited by hand) is an error rather than a silent no-op.
    """
    if not servers:
        raise ValueError("at least one upstream server is needed")
    text, found = _LISTEN.subn(lambda m: f"{m[1]}{m[2]}listen {listen};", template)
    if found != 1:
        raise ValueError("nginx template: expected one listen line after '# cluster.py: listen address'")
    def upstreams(m: re.Match[str]) -> str:
        return m[1] + "".join(f"{m[2]}server {s} {_SERVER_OPTIONS};\n" for s in servers)

    text, found = _SERVERS.subn(upstreams, text)
    if found != 1:
        raise ValueError("nginx template: expected server lines after '# cluster.py: upstream servers'")
    return text


def nginx_command(exe: str, prefix: Path, conf: Path, pid_file: Path, version: tuple[int, ...],
                  as_root: bool) -> list[str]:
    """The nginx command line: foreground, everything under `prefix`, its own pid file.

    As root, nginx would switch its workers to `nobody`; `user root;` keeps
    them as the invoking user. `-e stderr` (nginx >= 1.19.5) stops it from
    opening the compiled-in error log, which a normal user cannot write.
    """
    directives = f"daemon off; pid {pid_file};" + (" user root;" if as_root else "")
    cmd = [exe, "-p", f"{prefix}/", "-c", str(conf), "-g", directives]
    if version >= (1, 19, 5):
        cmd[1:1] = ["-e", "stderr"]
    return cmd


def find_executable(name: str) -> str:
    """`name` on PATH, else in the sbin directories a normal user's PATH often lacks."""
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _SBIN_DIRS if os.access(Path(d) / name, os.X_OK)), None)
    if found is None:
        raise ClusterError(f"{name} is not installed: run `make sysdeps` (Debian: apt-get install "
                           f"{'nginx-light' if name == 'nginx' else 'redis-server'})")
    return found


def nginx_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stderr
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in match[1].split(".")) if match else (0,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


# -- processes ---------------------------------------------------------------------

@dataclass
class Proc:
    """One child: its name in the cluster, the process, its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        """Send `sig` to this child by PID (nothing if it has exited and been reaped)."""
        if self.alive():
            self.popen.send_signal(sig)

    def wait_or_kill(self, timeout: float) -> bool:
        """Wait for the child; after `timeout`, SIGKILL its process group (nginx workers too).

        Returns True when it had to be killed.
        """
        try:
            self.popen.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()
            return True

    def stop(self, timeout: float) -> bool:
        self.signal(signal.SIGTERM)
        return self.wait_or_kill(timeout)


class Cluster:
    """redis-server, `nodes` hubnode processes and nginx, started and stopped together.

    Use as a context manager, or call start() and stop(). `port` 0 picks a
    free port for nginx; `redis_port` 0 a free one for Redis. `node_args` go
    to every node after the cluster's own flags (so they can add, e.g.
    `--heartbeat 0.5`).
    """

    def __init__(self, port: int = 8080, nodes: int = 3, redis_port: int = 0, host: str = "127.0.0.1",
                 node_args: Sequence[str] = (), workdir: Path | None = None, keep: bool = False) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.host = host
        self.port = port or free_port()
        self.redis_port = redis_port or free_port()
        self.node_ids = [f"node{i}" for i in range(1, nodes + 1)]
        self.node_ports = {node_id: free_port() for node_id in self.node_ids}
        self.node_args = tuple(node_args)
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="hub-cluster-"))
        self.keep = keep
        self.procs: dict[str, Proc] = {}
        self.forced: list[str] = []  # children that ignored SIGTERM past their grace and were killed

    # addresses
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    def node_url(self, node_id: str) -> str:
        return f"http://{self.host}:{self.node_ports[node_id]}"

    # life cycle
    def start(self, timeout: float = 30.0) -> Cluster:
        """Start Redis, the nodes and nginx; return once nginx serves and every node is registered."""
        end = time.monotonic() + timeout
        try:
            self._spawn("redis", [find_executable("redis-server"), "--port", str(self.redis_port),
                                  "--bind", self.host, "--save", "", "--appendonly", "no",
                                  "--maxmemory-policy", "noeviction", "--dir", str(self.dir)])
            self._wait(self._redis_answers, end, "redis-server to answer PING")
            for node_id in self.node_ids:
                self._spawn(node_id, [*_hubnode_command(), "--host", self.host,
                                      "--port", str(self.node_ports[node_id]), "--redis-url", self.redis_url,
                                      "--node-id", node_id, *self.node_args])
            for node_id in self.node_ids:
                self._wait(functools.partial(self._node_ready, node_id), end, f"{node_id} to be ready")
            self._spawn("nginx", self._nginx_command())
            self._wait(lambda: http_status(self.url + "/readyz") == 200, end, "nginx to proxy /readyz")
            self._wait(self._all_registered, end, "every node to register in Redis")
        except BaseException:
            self.stop_processes()  # the working directory stays: its logs explain the failure
            raise
        return self

    def stop_processes(self, node_grace: float = 15.0) -> None:
        """Stop everything this cluster started, by PID: the nodes (they drain), nginx, Redis.

        A node gets `node_grace` seconds (its --drain-timeout is 10 s by
        default) before SIGKILL; whoever needed SIGKILL is listed in `forced`.
        """
        nodes = [self.procs[n] for n in self.node_ids if n in self.procs]
        for proc in nodes:
            proc.signal(signal.SIGTERM)  # all drain at once
        self.forced += [proc.name for proc in nodes if proc.wait_or_kill(node_grace)]
        for name in ("nginx", "redis"):
            if name in self.procs and self.procs[name].stop(10.0):
                self.forced.append(name)

    def stop(self) -> None:
        """stop_processes(), then remove the working directory unless `keep`."""
        self.stop_processes()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def dead(self) -> list[Proc]:
        """Children that have exited (none should, until stop())."""
        return [p for p in self.procs.values() if not p.alive()]

    def logs(self) -> str:
        """The tail of every child's log, for a failure report."""
        return "\n".join(f"--- {p.name} (pid {p.pid}, exit {p.popen.poll()}) ---\n{p.output()}"
                         for p in self.procs.values())

    # internals
    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                # prctl in a forked child is safe only while this process has one thread
                preexec_fn=_die_with_parent if threading.active_count() == 1 else None)
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def _wait(self, ready: Callable[[], bool], end: float, what: str) -> None:
        while not ready():
            if self.dead():
                proc = self.dead()[0]
                raise ClusterError(f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                                   f"{what}:\n{proc.output()}")
            if time.monotonic() > end:
                raise ClusterError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.05)

    def _node_ready(self, node_id: str) -> bool:
        return http_status(self.node_url(node_id) + "/readyz") == 200

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.redis_port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _all_registered(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/stats", timeout=1.0) as resp:
                return int(json.load(resp)["nodes"]) == len(self.node_ids)
        except (OSError, ValueError, KeyError):
            return False

    def _nginx_command(self) -> list[str]:
        exe = find_executable("nginx")
        conf = self.dir / "nginx.conf"
        servers = [f"{self.host}:{self.node_ports[n]}" for n in self.node_ids]
        conf.write_text(render_nginx_conf(NGINX_TEMPLATE.read_text(), f"{self.host}:{self.port}", servers))
        return nginx_command(exe, self.dir, conf, self.dir / "nginx.pid", nginx_version(exe),
                             as_root=os.geteuid() == 0)


def _hubnode_command() -> list[str]:
    """The venv's `hubnode` script next to this interpreter, else `python -m hubnode.cli`."""
    script = Path(sys.executable).parent / "hubnode"
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "hubnode.cli"]


# -- command line ------------------------------------------------------------------

def summary(cluster: Cluster) -> str:
    """What `make cluster` prints once everything is up."""
    p = cluster.procs
    bin_dir = Path(sys.executable).parent
    hubctl = os.path.relpath(bin_dir / "hubctl") if (bin_dir / "hubctl").exists() else "hubctl"
    lines = [
        f"hubnode cluster up: {len(cluster.node_ids)} nodes behind nginx",
        f"  WebSocket  {cluster.ws_url}?user_id=alice",
        f"  demo page  {cluster.url}/",
        f"  HTTP API   {cluster.url}/api/stats   {cluster.url}/api/rooms   POST {cluster.url}/broadcast",
        *(f"  {n:<9}  {cluster.node_url(n)}   pid {p[n].pid}" for n in cluster.node_ids),
        f"  nginx      {cluster.url}   pid {p['nginx'].pid}",
        f"  redis      {cluster.redis_url}   pid {p['redis'].pid}",
        f"  logs       {cluster.dir}/*.log",
        "Inspect it from another shell:",
        f"  export HUB_REDIS_URL={cluster.redis_url}",
        f"  {hubctl} nodes",
        f"  {hubctl} members room1",
        f"  redis-cli -p {cluster.redis_port} HGETALL 'hub:members:{{room1}}'",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    node_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m deploy.cluster",
        description="Run redis-server, N hubnode nodes and nginx locally (no Docker). "
                    "Flags after `--` go to every node, e.g. `-- --heartbeat 0.5`.")
    parser.add_argument("--port", type=int, default=8080, help="nginx port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--redis-port", type=int, default=0, help="redis-server port (default: a free one)")
    parser.add_argument("--nodes", type=int, default=3, help="number of hubnode nodes (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and logs on exit")
    args = parser.parse_args(own)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    return args, node_args


class _Stop(Exception):
    """SIGTERM or SIGHUP: stop like on Ctrl-C."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _patience(_signum: int, _frame: FrameType | None) -> None:
    print("still stopping (nodes are draining)...", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args, node_args = parse_args(argv)
    # Ctrl-C even when started from a shell that ignores SIGINT in background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    cluster = Cluster(port=args.port, nodes=args.nodes, redis_port=args.redis_port,
                      node_args=node_args, keep=args.keep)
    status = 0
    try:
        cluster.start()
        print(summary(cluster), flush=True)
        while not cluster.dead():
            time.sleep(0.5)  # a signal interrupts this at once
        proc = cluster.dead()[0]
        print(f"{proc.name} exited with {proc.popen.returncode}; stopping the rest\n{proc.output()}",
              file=sys.stderr)
        cluster.keep, status = True, 1
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        cluster.keep, status = True, 1
    finally:
        signal.signal(signal.SIGINT, _patience)
        signal.signal(signal.SIGTERM, _patience)
        cluster.stop_processes()
        if cluster.forced:
            print(f"killed after ignoring SIGTERM: {', '.join(cluster.forced)}", file=sys.stderr)
            cluster.keep, status = True, 1
        cluster.stop()
    if cluster.keep:
        print(f"logs kept in {cluster.dir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
