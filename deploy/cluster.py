"""A real local cluster without Docker: redis-server, N hubnode nodes and nginx in front.

    python -m deploy.cluster [--port 8080] [--redis {single,cluster,sentinel}] [--redis-port 6380]
                             [--nodes 3] [--restart {no,on-failure,always}] [--keep] [-- NODE FLAGS...]

This is what `make cluster` runs, and what tests/e2e/test_cluster_nginx.py
boots on free ports. Everything runs as the current user from the venv:
redis-server without persistence on a fixed port (6380, so the examples'
HUB_REDIS_URL stays valid; `--redis-port 0` picks a free one), `hubnode
--node-id node1..N` on free loopback ports, and nginx (the Debian package's
binary) with deploy/nginx.conf rendered for those ports, in the foreground
(`daemon off;`) with its pid file, temporary files and the cluster's logs in
one working directory. A port it needs that is taken stops it at once, with
one line saying which and how to choose another.

`--redis cluster` runs a Redis Cluster instead (3 primaries on 7001-7003,
their replicas on 7004-7006, bus ports +10000) and `--redis sentinel` a
primary (6380), its replica (6381) and three sentinels (26380-26382)
watching it as `hubmaster`; deploy/redis_servers.py builds both, and the
nodes get `redis+cluster://...` or `redis+sentinel://.../hubmaster`.
`--redis-port` is then the first of those ports (0: free ones).

While it runs, it checks its children every 0.5 s (Cluster.check). One that
exits is reported on stderr (with the end of its log when it exited with an
error code), what is left of its process group is killed, and the rest keep
running. The restart policy decides what follows, as in Docker: `on-failure`
(the default) restarts a child killed by a signal or exiting non-zero, not
one that exited 0 (a node drained by `kill -TERM` stays down); `always`
restarts it whatever its exit; `no` never does. A restart uses the same
command, so a node keeps its id, port and flags and nginx's upstream entry is
valid again; it waits 1 s, doubled for each restart of a child that ran less
than 10 s, up to 30 s, and "NAME restarted (pid N)" is printed once the child
answers its readiness check (a node's /readyz, which needs its Redis entry).

Each child runs in its own process group, so a Ctrl-C in the terminal
reaches this script only; it then stops what it started, by PID and in
order: the nodes first (SIGTERM: they drain, clients get close 1001 and
reconnect), then nginx, then Redis (sentinels first), and exits 0.
Children also get SIGTERM if this script dies without cleaning up (Linux
parent-death signal).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
from typing import Any

from deploy.redis_servers import (
    RedisClusterProcs,
    RedisProcess,
    RedisTopologyError,
    SentinelProcs,
    Topology,
    find_executable,
    free_port,
)
from deploy.redis_servers import die_with_parent as _die_with_parent
from hubnode.validate import RULES, Invalid, Rule, integer, whole
from publisher.usage import OneLineParser

__all__ = ["POLICIES", "REDIS_MODES", "Cluster", "ClusterError", "Event", "PortUnavailable", "describe_exit",
           "find_executable", "free_port", "main", "nginx_command", "redis_port_problem", "redis_topology",
           "render_nginx_conf", "restart_delay"]

NGINX_TEMPLATE = Path(__file__).with_name("nginx.conf")
_LISTEN = re.compile(r"(# cluster\.py: listen address\n)([ \t]*)listen [^;\n]+;")
_SERVERS = re.compile(r"(# cluster\.py: upstream servers[^\n]*\n)([ \t]*)server [^;\n]+;\n(?:[ \t]*server [^;\n]+;\n)*")
_SERVER_OPTIONS = "max_fails=1 fail_timeout=5s"
DEFAULT_REDIS_PORT = 6380  # `python -m deploy.cluster` (make cluster); not 6379, a system Redis's port
REDIS_MODES = ("single", "cluster", "sentinel")  # --redis
# --redis-port's default per mode, and how far above it the mode's ports reach: a cluster's six nodes and
# their bus ports (+10000); a sentinel setup's primary, replica and sentinels (+20000, +20001, +20002)
DEFAULT_REDIS_PORTS = {"single": DEFAULT_REDIS_PORT, "cluster": 7001, "sentinel": DEFAULT_REDIS_PORT}
_REDIS_PORT_SPAN = {"single": 0, "cluster": 10005, "sentinel": 20002}
_SENTINEL_OFFSET = 20000
# A Redis server of a cluster or sentinel setup is restarted no sooner than this: time for its replica to be
# promoted first. Without persistence, a primary back before that would be an empty primary, and its
# replica would copy the emptiness; after it, it comes back as a replica and copies the data instead.
REDIS_FAILOVER_WAIT = {"single": 0.0, "cluster": 6.0, "sentinel": 5.0}

POLICIES = ("no", "on-failure", "always")  # --restart, as in Docker
BACKOFF_FIRST = 1.0  # seconds before the first restart
BACKOFF_MAX = 30.0  # the doubling stops here
BACKOFF_RESET = 10.0  # a child that ran this long starts again from BACKOFF_FIRST
READY_WARN = 30.0  # a restarted child not ready after this long is reported (once)
LOG_TAIL_LINES = 12  # of a child's log, shown when it exited with an error code


class ClusterError(RuntimeError):
    """The cluster could not start or a process died; the message says which and shows its log."""


class PortUnavailable(ClusterError):
    """A fixed port the cluster needs is taken; the message (one line) says which and how to choose another."""


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


def restart_delay(policy: str, returncode: int, ran_for: float, last_delay: float | None) -> float | None:
    """Seconds to wait before restarting a child that exited with `returncode`, or None: do not restart.

    `policy` is one of POLICIES: `no` never restarts, `on-failure` restarts
    unless the exit code is 0 (a signal or a non-zero code is a failure),
    `always` always does. The delay is 1 s, doubled for each restart of a
    child that ran less than 10 s (`ran_for`) since the previous one, up to
    30 s; `last_delay` is the delay of that previous restart (None: none yet).
    """
    if policy not in POLICIES:
        raise ValueError(f"restart policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "no" or (policy == "on-failure" and returncode == 0):
        return None
    if last_delay is None or ran_for >= BACKOFF_RESET:
        return BACKOFF_FIRST
    return min(BACKOFF_MAX, last_delay * 2)


def describe_exit(returncode: int) -> str:
    """`-9 (signal SIGKILL)` for a child killed by a signal (Popen's negative code), else the code."""
    if returncode >= 0:
        return str(returncode)
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return f"{returncode} (signal {name})"


def port_problem(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on at `host` (already in use, ...), or None when it can.

    SO_REUSEADDR as servers set it: a port with connections in TIME_WAIT
    (a cluster stopped a moment ago) is free, one with a listener is not.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
    return None


def redis_port_problem(mode: str, base: int) -> str | None:
    """Why `--redis MODE --redis-port BASE` cannot work (its ports would pass 65535), or None."""
    top = base + _REDIS_PORT_SPAN[mode]
    if base == 0 or top <= 65535:
        return None
    return (f"{base}: --redis {mode} listens on ports up to {base}+{_REDIS_PORT_SPAN[mode]}, so at most "
            f"{65535 - _REDIS_PORT_SPAN[mode]} (or 0: free ports)")


def redis_topology(mode: str, base: int, folder: Path) -> Topology:
    """The Redis processes of `--redis MODE`, from port `base` up (0: free ports), their files in `folder`.

    single is one redis-server named `redis` on `base`; cluster is
    `redis1..6` on base..base+5 (primaries first); sentinel is `redis1`
    (primary) on base, `redis2` (replica) on base+1 and `sentinel1..3` on
    base+20000.. (6380 -> 26380, Redis's own habit).
    """
    if mode == "single":
        return RedisProcess("redis", base or free_port(), folder)
    if mode == "cluster":
        return RedisClusterProcs(folder / "redis", ports=[base + i for i in range(6)] if base else None)
    if mode == "sentinel":
        return SentinelProcs(folder / "redis", ports=[base, base + 1] if base else None,
                             sentinel_ports=[base + _SENTINEL_OFFSET + i for i in range(3)] if base else None)
    raise ValueError(f"--redis {mode!r} is not one of {', '.join(REDIS_MODES)}")


def nginx_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stderr
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in match[1].split(".")) if match else (0,)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


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

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of this exited child's process group (nginx workers outlive a killed master)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(f"  | {line}" for line in self.output(16000).splitlines()[-lines:])


@dataclass(frozen=True)
class Event:
    """What Cluster.check() saw, for the user: `kind` is exited, restarted, unready or restart-failed."""

    kind: str
    name: str
    text: str


@dataclass
class _Watch:
    """Supervision state of one child, kept across its restarts."""

    started: float  # time.monotonic() of its last start
    ready: bool = True  # answered its readiness check since then (start() waits for every child)
    reported: bool = False  # its exit was reported
    warned: bool = False  # "not ready" was reported for this start
    restart_at: float | None = None  # a restart is due then
    delay: float | None = None  # the backoff of its last restart


class Cluster:
    """Redis, `nodes` hubnode processes and nginx, started and stopped together.

    Use as a context manager, or call start() and stop(). `port` 0 picks a
    free port for nginx. `redis` is the Redis topology (REDIS_MODES, see
    redis_topology()) and `redis_port` its first port, 0 for free ones;
    every Redis process is a supervised child like the others. `node_args` go
    to every node after the cluster's own flags (so they can add, e.g.
    `--heartbeat 0.5`). Nothing watches the children unless check() is
    called (main() does every 0.5 s): it reports exits and applies the
    `restart` policy (see restart_delay()).
    """

    def __init__(self, port: int = 8080, nodes: int = 3, redis_port: int = 0, host: str = "127.0.0.1",
                 node_args: Sequence[str] = (), workdir: Path | None = None, keep: bool = False,
                 restart: str = "on-failure", redis: str = "single") -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if restart not in POLICIES:
            raise ValueError(f"restart policy {restart!r} is not one of {', '.join(POLICIES)}")
        self.host = host
        self.port = port or free_port()
        self.node_ids = [f"node{i}" for i in range(1, nodes + 1)]
        self.node_ports = {node_id: free_port() for node_id in self.node_ids}
        self.node_args = tuple(node_args)
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="hub-cluster-"))
        self.redis_mode = redis
        self.redis = redis_topology(redis, redis_port, self.dir)  # Redis always listens on 127.0.0.1
        self.redis_procs = {proc.name: proc for proc in self.redis.procs}
        self.redis_port = self.redis.procs[0].port  # the first one: a cluster seed, the initial primary
        self.keep = keep
        self.restart = restart
        self.procs: dict[str, Proc] = {}
        self.commands: dict[str, list[str]] = {}  # what each child was started with, for its restarts
        self.forced: list[str] = []  # children that ignored SIGTERM past their grace and were killed
        self.crashed: list[str] = []  # children seen exiting with an error code by check(): keep their logs
        self._watch: dict[str, _Watch] = {}

    # addresses
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def redis_url(self) -> str:
        """What the nodes get as --redis-url: redis://, redis+cluster:// or redis+sentinel://."""
        return self.redis.url

    def node_url(self, node_id: str) -> str:
        return f"http://{self.host}:{self.node_ports[node_id]}"

    # life cycle
    def start(self, timeout: float = 30.0) -> Cluster:
        """Start Redis, the nodes and nginx; return once nginx serves and every node is registered."""
        end = time.monotonic() + timeout
        self.check_ports()
        try:
            self.start_redis(end)
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

    def start_redis(self, end: float) -> None:
        """Start the Redis topology's processes as supervised children and run its steps (joining a
        Redis Cluster, waiting for the sentinels to agree) before time.monotonic() `end`."""
        for phase in self.redis.phases():
            for proc in phase.procs:
                proc.prepare()
                self._spawn(proc.name, proc.command())
            for proc in phase.procs:
                self._wait(proc.ping, end, f"{proc.name} to answer PING")
            if phase.then is not None:
                phase.then()
            self._wait(phase.ready, end, phase.what)

    def stop_processes(self, node_grace: float = 15.0) -> None:
        """Stop everything this cluster started, by PID: the nodes (they drain), nginx, Redis.

        A node gets `node_grace` seconds (its --drain-timeout is 10 s by
        default) before SIGKILL; whoever needed SIGKILL is listed in `forced`.
        """
        nodes = [self.procs[n] for n in self.node_ids if n in self.procs]
        for proc in nodes:
            proc.signal(signal.SIGTERM)  # all drain at once
        self.forced += [proc.name for proc in nodes if proc.wait_or_kill(node_grace)]
        for name in ("nginx", *reversed(self.redis_procs)):  # sentinels before the servers they watch
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

    def check_ports(self) -> None:
        """Raise PortUnavailable (one line) when the nginx or Redis port cannot be listened on.

        Without this, a Redis already on the port would answer the cluster's
        PING, and the start would time out on nodes from another cluster.
        """
        mode = "" if self.redis_mode == "single" else f"--redis {self.redis_mode} "
        ports = [("Redis", port, "--redis-port") for port in self.redis.listen_ports] + [("nginx", self.port, "--port")]
        for what, port, flag in ports:
            problem = port_problem(self.host, port)
            if problem is not None:
                raise PortUnavailable(
                    f"the {what} port {self.host}:{port} {problem}; stop what uses it or choose another port: "
                    f'make cluster CLUSTER_ARGS="{mode}{flag} 0" (a free one) or {flag} N')

    def check(self, now: float | None = None) -> list[Event]:
        """One supervision step: report children that exited, restart those due, report those back.

        A child found exited is reported once, what is left of its process
        group is killed, and a restart is scheduled if the policy says so; a
        restart due by `now` is made with the child's original command; a
        restarted child is reported once it answers its readiness check (or
        once, after READY_WARN s, that it does not). Nothing blocks but the
        readiness probes of restarted children (half a second at most each).
        `now` is time.monotonic() unless given, so a test can step through
        the backoff without waiting.
        """
        now = time.monotonic() if now is None else now
        events: list[Event] = []
        for name in list(self.procs):
            proc, watch = self.procs[name], self._watch[name]
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    events += self._restart(name, now)
            elif not proc.alive():
                if not watch.reported:
                    events.append(self._exited(proc, watch, now))
            elif not watch.ready:
                if self._ready(name):
                    watch.ready = True
                    events.append(Event("restarted", name, f"{name} restarted (pid {proc.pid})"))
                elif now - watch.started >= READY_WARN and not watch.warned:
                    watch.warned = True
                    events.append(Event("unready", name, f"{name} (pid {proc.pid}) is not ready "
                                                         f"{READY_WARN:g} s after its restart; see {proc.log}"))
        return events

    def logs(self) -> str:
        """The tail of every child's log, for a failure report."""
        return "\n".join(f"--- {p.name} (pid {p.pid}, exit {p.popen.poll()}) ---\n{p.output()}"
                         for p in self.procs.values())

    # internals
    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("ab") as out:  # a restart appends: the crash that caused it stays in the log
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, process_group=0,
                # prctl in a forked child is safe only while this process has one thread
                preexec_fn=_die_with_parent if threading.active_count() == 1 else None)
        self.procs[name] = Proc(name, popen, log)
        self.commands[name] = cmd
        self._watch.setdefault(name, _Watch(started=time.monotonic()))
        return self.procs[name]

    def _exited(self, proc: Proc, watch: _Watch, now: float) -> Event:
        code = proc.popen.returncode
        watch.reported = True
        proc.kill_leftovers()
        delay = restart_delay(self.restart, code, now - watch.started, watch.delay)
        if delay is not None and proc.name in self.redis_procs and self.redis_procs[proc.name].sentinel_conf is None:
            delay = max(delay, REDIS_FAILOVER_WAIT[self.redis_mode])
        if delay is None:
            plan = f"not restarting it (--restart {self.restart}); the others keep running"
        else:
            watch.delay, watch.restart_at = delay, now + delay
            plan = f"restarting it in {delay:g} s (--restart {self.restart})"
        text = f"{proc.name} exited with {describe_exit(code)}; {self._impact(proc.name)}; {plan}"
        if code > 0:  # a crash: its traceback says why (a signal's log says nothing)
            self.crashed.append(proc.name)
            text += f"\nthe end of {proc.log}:\n{proc.log_tail()}"
        return Event("exited", proc.name, text)

    def _restart(self, name: str, now: float) -> list[Event]:
        watch = self._watch[name]
        watch.restart_at = None
        try:
            self._spawn(name, self.commands[name])
        except OSError as exc:  # the executable is gone, no memory, ...: try again, later each time
            watch.delay = delay = min(BACKOFF_MAX, 2 * (watch.delay or BACKOFF_FIRST))
            watch.restart_at = now + delay
            return [Event("restart-failed", name, f"could not restart {name}: {exc}; trying again in {delay:g} s")]
        watch.started, watch.ready, watch.reported, watch.warned = now, False, False, False
        return []

    def _impact(self, name: str) -> str:
        """What the exit of child `name` means for clients, in a few words."""
        if name in self.node_ports:
            others = [n for n in self.node_ids if n != name and n in self.procs and self.procs[n].alive()]
            if others:
                return f"its clients reconnect through nginx to {', '.join(others)}"
            return "no node is left, so nginx answers 502"
        if name == "nginx":
            return f"its clients are cut off and nothing answers on {self.url} (the nodes keep their own ports)"
        if self.redis_mode == "cluster":
            return ("if it was a primary, the Redis Cluster gives its slots to its replica within about 4 s; "
                    "back, it rejoins as a replica")
        if name.startswith("sentinel"):
            return "the other sentinels still make the quorum of 2 that a failover needs"
        if self.redis_mode == "sentinel":
            return ("if it was the primary, the sentinels promote the replica within about 3 s; "
                    "back, it is made a replica")
        return (f"the nodes have no Redis (/readyz 503, publishes refused) until one answers on port "
                f"{self.redis_port}, then re-register")

    def _ready(self, name: str) -> bool:
        """The readiness check of a restarted child: a node's /readyz, nginx's own health, Redis's PING."""
        if name in self.node_ports:
            return self._node_ready(name)
        if name == "nginx":
            return http_status(self.url + "/nginx-healthz", timeout=0.5) == 200
        return self.redis_procs[name].ping()

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
        return http_status(self.node_url(node_id) + "/readyz", timeout=0.5) == 200

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
        *_redis_lines(cluster),
        f"  logs       {cluster.dir}/*.log",
        "Inspect it from another shell:",
        f"  export HUB_REDIS_URL={cluster.redis_url}",
        f"  {hubctl} nodes",
        f"  {hubctl} members room1",
        f"  redis-cli {'-c ' if cluster.redis_mode == 'cluster' else ''}-p {cluster.redis_port} "
        f"HGETALL 'hub:members:{{room1}}'",
        _POLICY_LINES[cluster.restart],
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _redis_lines(cluster: Cluster) -> list[str]:
    """The summary's Redis lines: its URL and PID, or for a topology each process's role, then the URL."""
    p = cluster.procs
    if cluster.redis_mode == "single":
        return [f"  redis      {cluster.redis_url}   pid {p['redis'].pid}"]
    roles = cluster.redis.roles()
    return [*(f"  {proc.name:<9}  {proc.address}   {roles[proc.name]}   pid {p[proc.name].pid}"
              for proc in cluster.redis.procs),
            f"  redis      {cluster.redis_url}"]


_POLICY_LINES = {
    "on-failure": "A node, nginx or Redis that dies is reported and restarted (--restart on-failure); "
                  "one that exits 0 (kill -TERM: a drained node) stays down.",
    "always": "A node, nginx or Redis that exits is reported and restarted (--restart always).",
    "no": "A node, nginx or Redis that exits is reported and stays down (--restart no); the rest keep running.",
}


def _checked(rule: Rule) -> Callable[[str], Any]:
    """An argparse type from one of hubnode's setting rules: the same values, the same words."""
    def convert(text: str) -> Any:
        try:
            return rule.parse(text)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return convert


_PORT = _checked(RULES["port"])
_NODE_COUNT = _checked(Rule(integer, whole(1)))


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own flags, and the flags after `--` for every node, all checked before anything starts.

    The nodes' flags go through hubnode's own parser (which exits 2 with one
    line): a node that refuses its flags would otherwise be restarted forever.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    node_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(
        prog="python -m deploy.cluster",
        description="Run Redis, N hubnode nodes and nginx locally (no Docker) until Ctrl-C. A child "
                    "that exits is reported on stderr and the rest keep running; --restart says whether it is "
                    "restarted. Flags after `--` go to every node, e.g. `-- --heartbeat 0.5`.")
    parser.add_argument("--port", type=_PORT, default=8080,
                        help="nginx port on 127.0.0.1 (default 8080; 0: a free one); a port in use stops the "
                             "script at once")
    parser.add_argument("--redis", choices=REDIS_MODES, default="single",
                        help="the Redis the nodes share: single (default) one redis-server; cluster a Redis "
                             "Cluster of 3 primaries and 3 replicas (nodes get redis+cluster://); sentinel a "
                             "primary, its replica and 3 sentinels (nodes get redis+sentinel://.../hubmaster)")
    parser.add_argument("--redis-port", type=_PORT, default=None,
                        help=f"the first Redis port on 127.0.0.1 (default {DEFAULT_REDIS_PORT}; --redis cluster: "
                             f"{DEFAULT_REDIS_PORTS['cluster']}-{DEFAULT_REDIS_PORTS['cluster'] + 5}, bus ports "
                             f"+10000; --redis sentinel: {DEFAULT_REDIS_PORT} and {DEFAULT_REDIS_PORT + 1}, "
                             f"sentinels +20000..20002; 0: free ones); a port in use stops the script at once")
    parser.add_argument("--nodes", type=_NODE_COUNT, default=3, help="number of hubnode nodes (default 3)")
    parser.add_argument("--restart", choices=POLICIES, default="on-failure",
                        help="what to do when a node, nginx or Redis exits; the rest keep running in any case. "
                             "on-failure (default): restart it unless it exited 0 (kill -TERM drains a node "
                             "and keeps it down); always: restart it; no: leave it down. Restarts wait 1 s, "
                             "doubled while a child keeps dying within 10 s, up to 30 s")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and logs on exit")
    args = parser.parse_args(own)
    if args.redis_port is None:
        args.redis_port = DEFAULT_REDIS_PORTS[args.redis]
    problem = redis_port_problem(args.redis, args.redis_port)
    if problem is not None:
        parser.error(f"argument --redis-port: {problem}")
    if any(arg == "--redis-url" or arg.startswith("--redis-url=") for arg in node_args):
        parser.error("--redis-url after `--`: the script gives every node the URL of the Redis it runs; "
                     "choose that Redis with --redis {" + ",".join(REDIS_MODES) + "}")
    from hubnode.config import parse_args as node_parse_args  # the node's own rules, its own one-line errors

    node_parse_args(["--redis-url", "redis://127.0.0.1:6380/0", "--node-id", "node1", *node_args])
    return args, node_args


class _Stop(Exception):
    """SIGTERM or SIGHUP (or SIGINT while supervising): stop like on Ctrl-C."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _patience(_signum: int, _frame: FrameType | None) -> None:
    print("still stopping (nodes are draining)...", file=sys.stderr, flush=True)


class _Sleeper:
    """Stop signals for the supervision loop: they raise _Stop in sleep() only, never inside a check.

    A restart cut in half by an exception could leave a child started but
    not recorded, which stop_processes() would not stop; so a signal that
    arrives during a check is kept and raised by the next sleep().
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self.sleeping = False

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.pending = signal.Signals(signum).name
        if self.sleeping:
            raise _Stop(self.pending)

    def sleep(self, seconds: float) -> None:
        self.sleeping = True
        try:
            if self.pending is not None:
                raise _Stop(self.pending)
            time.sleep(seconds)
        finally:
            self.sleeping = False


def supervise(cluster: Cluster, interval: float = 0.5) -> None:
    """Check the children every `interval` seconds and print what happened, until a stop signal (_Stop)."""
    sleeper = _Sleeper()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, sleeper.handle)
    while True:
        for event in cluster.check():
            print(event.text, file=sys.stderr, flush=True)
        sleeper.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    args, node_args = parse_args(argv)
    # Ctrl-C even when started from a shell that ignores SIGINT in background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    cluster = Cluster(port=args.port, nodes=args.nodes, redis_port=args.redis_port, redis=args.redis,
                      node_args=node_args, keep=args.keep, restart=args.restart)
    status = 0
    try:
        cluster.start()
        print(summary(cluster), flush=True)
        supervise(cluster)  # returns only by _Stop
    except (KeyboardInterrupt, _Stop):
        print("\nstopping...", file=sys.stderr, flush=True)
    except PortUnavailable as exc:  # nothing started: one line, and no (empty) logs directory to keep
        print(f"cluster: {exc}", file=sys.stderr)
        cluster.keep, status = False, 1
    except (ClusterError, RedisTopologyError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        cluster.keep, status = True, 1
    finally:
        signal.signal(signal.SIGINT, _patience)
        signal.signal(signal.SIGTERM, _patience)
        signal.signal(signal.SIGHUP, _patience)
        cluster.stop_processes()
        if cluster.forced:
            print(f"killed after ignoring SIGTERM: {', '.join(cluster.forced)}", file=sys.stderr)
            cluster.keep, status = True, 1
        if cluster.crashed:  # their tracebacks are in the logs
            cluster.keep = True
        cluster.stop()
    if cluster.keep:
        print(f"logs kept in {cluster.dir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
