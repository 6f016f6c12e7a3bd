"""Redis topologies started for real, by PID, without Docker: one server, a Redis Cluster, a Sentinel setup.

    RedisProcess(name, port, workdir, tls=TlsFiles.make(folder))   # one redis-server, TLS optional
    RedisClusterProcs(folder)                                       # 3 primaries + 3 replicas, joined
    SentinelProcs(folder)                                           # a primary, its replica, 3 sentinels

The test suite's fixtures (tests/conftest.py) and `make cluster --redis
cluster|sentinel` (deploy/cluster.py) both start their Redis here, so the
topology a test passes against is the one a developer runs. Each topology is
a list of RedisProcess objects and a few *phases*: processes to spawn, an
admin step to run once they answer PING, and a condition to wait for.
start() runs the phases itself; deploy/cluster.py spawns the same commands
under its own supervisor and runs the same steps (see Phase).

Everything is small on purpose (the machines have 2 cores): loopback only,
no persistence (`--save '' --appendonly no`), `noeviction` as hubnode
requires, and short failure-detection timeouts (cluster node timeout 2 s,
sentinel down-after 1 s) so a failover in a test takes 2-4 s, not 30.
Waits poll a condition until a deadline; nothing sleeps to synchronise.
Children get SIGTERM when the process that started them dies (Linux
parent-death signal), and stop() stops everything by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

__all__ = ["HOST", "SLOTS", "NodeLine", "Phase", "RedisClusterProcs", "RedisProcess", "RedisTopologyError",
           "SentinelProcs", "ShardCounts", "TlsFiles", "Topology", "die_with_parent", "find_executable",
           "free_port", "free_ports", "key_slot", "wait_for"]

HOST = "127.0.0.1"
SLOTS = 16384  # hash slots of a Redis Cluster
CLUSTER_NODE_TIMEOUT_MS = 2000  # a primary is failed over ~2-4 s after it stops answering
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/usr/bin", "/usr/local/bin")
# A primary starts a diskless full sync 5 s after a replica asks (waiting for more replicas) by default
_REPLICATION = ("--repl-diskless-sync-delay", "0")
_POLL = 0.05  # seconds between two looks at a condition


class RedisTopologyError(RuntimeError):
    """A Redis process or topology did not start or reach the state waited for; the message says which."""


# -- process helpers (deploy/cluster.py uses them too) ------------------------------

def find_executable(name: str) -> str:
    """`name` on PATH, else in the sbin directories a normal user's PATH often lacks."""
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _SBIN_DIRS if os.access(Path(d) / name, os.X_OK)), None)
    if found is None:
        package = {"nginx": "nginx-light", "openssl": "openssl"}.get(name, "redis-server")
        raise RedisTopologyError(f"{name} is not installed: run `make sysdeps` (Debian: apt-get install {package})")
    return found


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all bound at once, so the kernel cannot hand one out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_for(ready: Callable[[], object], timeout: float, what: str,
             check: Callable[[], None] | None = None) -> None:
    """Poll `ready` until it is truthy; RedisTopologyError after `timeout` s. `check` may raise sooner
    (a process that died), so a dead server fails the wait at once instead of at its deadline."""
    end = time.monotonic() + timeout
    while not ready():
        if check is not None:
            check()
        if time.monotonic() > end:
            raise RedisTopologyError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(_POLL)


def _run(cmd: Sequence[str], what: str, timeout: float = 60) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RedisTopologyError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


# -- TLS ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it, and a
    second, unrelated CA (`wrong_ca_*`) that a client can wrongly trust. Made by openssl at run time
    (make()), so no key is ever checked in, and valid for two days."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_cert: Path
    wrong_ca_key: Path

    @classmethod
    def make(cls, folder: Path) -> TlsFiles:
        """Create the files in `folder` (P-256 keys: quick to make, accepted by Redis and Python's ssl).

        The extensions are those a strict verifier (Python 3.13's
        VERIFY_X509_STRICT) asks for: key usage on the CAs, key identifiers,
        and a server certificate usable as a client one too, since Redis
        presents it when it connects to a replica or a cluster peer.
        """
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(*(folder / f"{stem}.{ext}" for stem in ("ca", "server", "client", "wrong_ca")
                      for ext in ("crt", "key")))
        files._make_ca(files.ca_cert, files.ca_key, "hubnode test CA")
        files._make_ca(files.wrong_ca_cert, files.wrong_ca_key, "hubnode unrelated CA")
        files._make_leaf(files.server_cert, files.server_key, "localhost", "serverAuth,clientAuth",
                         "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        files._make_leaf(files.client_cert, files.client_key, "hubnode test client", "clientAuth", "")
        for key in (files.ca_key, files.wrong_ca_key, files.server_key, files.client_key):
            key.chmod(0o600)
        return files

    def _make_ca(self, cert: Path, key: Path, name: str) -> None:
        _run([find_executable("openssl"), "req", "-x509", "-new", "-nodes", "-newkey", "ec",
              "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(cert), "-days", "2",
              "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], f"openssl: the CA {name}")

    def _make_leaf(self, cert: Path, key: Path, name: str, usage: str, extra: str) -> None:
        csr, ext = cert.with_suffix(".csr"), cert.with_suffix(".ext")
        ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
                       f"authorityKeyIdentifier=keyid,issuer\n{extra}")
        openssl = find_executable("openssl")
        _run([openssl, "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"], f"openssl: the request for {name}")
        _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
              "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
             f"openssl: the certificate for {name}")
        csr.unlink()
        ext.unlink()


# -- one server --------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One step of starting a topology: spawn `procs`, wait until each answers PING, call `then` (an
    admin step such as `redis-cli --cluster create`), then wait until `ready()` says so (`what` names
    it in a timeout message). `ready` must not block for long: it is polled."""

    procs: Sequence[RedisProcess]
    ready: Callable[[], bool]
    what: str
    then: Callable[[], None] | None = None


class Topology(Protocol):
    """What deploy/cluster.py needs of a topology to run it under its own supervisor."""

    @property
    def procs(self) -> list[RedisProcess]: ...

    @property
    def url(self) -> str: ...

    @property
    def listen_ports(self) -> list[int]: ...

    def phases(self) -> list[Phase]: ...

    def roles(self) -> dict[str, str]: ...


class RedisProcess:
    """One redis-server (or sentinel) on `port` at 127.0.0.1, its files in `workdir`.

    A data server runs without persistence and with `noeviction`; `extra`
    adds redis-server flags (cluster or replication settings). With `tls`
    it listens on TLS only (`--port 0 --tls-port PORT`); clients need not
    present a certificate (`--tls-auth-clients optional`) but must trust the
    CA. With `sentinel_conf` (the text of a sentinel.conf) it is a Sentinel,
    whose config file is written once, before its first start: Sentinel
    rewrites that file with what it learns, and a restart keeps it.
    """

    def __init__(self, name: str, port: int, workdir: Path, extra: Sequence[str] = (),
                 tls: TlsFiles | None = None, sentinel_conf: str | None = None) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.extra = tuple(extra)
        self.tls = tls
        self.sentinel_conf = sentinel_conf
        self.popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RedisProcess {self.name} {HOST}:{self.port} pid {self.pid}>"

    # addresses
    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def conf(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def procs(self) -> list[RedisProcess]:
        return [self]

    @property
    def listen_ports(self) -> list[int]:
        return [self.port]

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def command(self) -> list[str]:
        """The redis-server command line (call prepare() before running it)."""
        exe = find_executable("redis-server")
        if self.sentinel_conf is not None:
            return [exe, str(self.conf), "--sentinel", "--port", str(self.port), "--bind", HOST,
                    "--dir", str(self.workdir)]
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                      "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca_cert),
                      "--tls-auth-clients", "optional"]
        return [exe, *listen, "--bind", HOST, "--save", "", "--appendonly", "no", "--maxmemory-policy",
                "noeviction", "--dir", str(self.workdir), *self.extra]

    def prepare(self) -> None:
        """Create the working directory, and a sentinel's config file unless an earlier start wrote it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sentinel_conf is not None and not self.conf.exists():
            self.conf.write_text(self.sentinel_conf)

    def phases(self) -> list[Phase]:
        return [Phase([self], self.ping, f"{self.name} to answer PING")]

    def roles(self) -> dict[str, str]:
        return {self.name: "sentinel" if self.sentinel_conf is not None else "server"}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # life cycle
    def spawn(self) -> None:
        """Start the process without waiting for it; its output goes to `log` (appended on restarts)."""
        self.prepare()
        command, preexec = self.command(), None
        if threading.active_count() == 1:  # prctl in a forked child is safe only while we have one thread
            preexec = die_with_parent
        elif setpriv := shutil.which("setpriv"):  # else util-linux sets it, then execs redis-server (same PID)
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec,
                process_group=0)  # a Ctrl-C in the terminal reaches the starter only, which stops us

    def start(self, timeout: float = 10.0) -> Self:
        """Spawn the process and return once it answers PING; on failure it is stopped and the error shows
        the end of its log."""
        self.spawn()
        try:
            wait_for(self.ping, timeout, f"{self.name} to answer PING on port {self.port}", self.check_alive)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; nothing if it is not running."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` by PID; for SIGKILL also wait until it is gone (any other signal returns at once, so
        SIGSTOP can freeze a server and SIGCONT thaw it)."""
        if self.popen is None or self.popen.poll() is not None:
            raise RedisTopologyError(f"{self.name} is not running")
        self.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def restart(self, timeout: float = 10.0) -> Self:
        """stop() if running, then start() with the same command: same port, same working directory, so a
        cluster node rejoins with its nodes.conf and a sentinel keeps what it learnt."""
        self.stop()
        return self.start(timeout)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise RedisTopologyError, with the end of its log, if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise RedisTopologyError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])

    # talking to it
    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client of this server alone (decoded replies, 2 s timeouts, no retries: a dead node
        must not cost each poll redis-py's backoff of several seconds); close it, or use `with`."""
        settings: dict[str, Any] = {"decode_responses": True, "socket_timeout": 2.0, "socket_connect_timeout": 2.0,
                                    "retry": Retry(NoBackoff(), 0)}
        if self.tls is not None:
            settings.update(ssl=True, ssl_ca_certs=str(self.tls.ca_cert))
        return redis.Redis(host=HOST, port=self.port, **{**settings, **options})

    def ping(self) -> bool:
        """True when the server answers PING within half a second."""
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def call(self, *args: Any) -> Any:
        """One command on a fresh connection; a multi-word command is not parsed by redis-py (CLUSTER NODES: text)."""
        with self.client() as r:
            return r.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as r:
            return dict(r.info(section))

    def answers(self, *args: Any) -> Any:
        """call(), or None when the server cannot be reached (a predicate polling a dead node)."""
        try:
            return self.call(*args)
        except (redis.RedisError, OSError):
            return None


# -- Redis Cluster -----------------------------------------------------------------------

@dataclass(frozen=True)
class NodeLine:
    """One line of CLUSTER NODES: a node as some node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None  # for a replica: its primary's id
    slots: frozenset[int]

    @classmethod
    def parse(cls, line: str) -> NodeLine:
        node_id, addr, flags, primary, *_ = fields = line.split()
        slots: set[int] = set()
        for item in fields[8:]:
            if item.startswith("["):  # [slot->-id] / [slot-<-id]: a migration in progress, not ownership
                continue
            low, _, high = item.partition("-")
            slots.update(range(int(low), int(high or low) + 1))
        port = int(addr.split("@")[0].rsplit(":", 1)[1])
        return cls(node_id, port, frozenset(flags.split(",")), None if primary == "-" else primary,
                   frozenset(slots))

    @property
    def primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool({"fail", "fail?", "noaddr"} & self.flags)


@dataclass(frozen=True)
class ShardCounts:
    """One cluster node's pub/sub so far: the SPUBLISH and PUBLISH commands clients sent it, the messages
    the cluster bus brought it from other nodes (a PUBLISH goes to every node, an SPUBLISH only to the
    replicas of its shard), and the shard channels with subscribers on it now."""

    spublish: int
    publish: int
    bus_publish: int
    bus_publishshard: int
    shard_channels: int


class RedisClusterProcs:
    """A Redis Cluster: `primaries` primaries with `replicas_per_primary` replicas each, all on loopback.

    Nodes `redis1..N` run with `--cluster-enabled yes`, a 2 s node timeout
    and `--cluster-replica-validity-factor 0` (a replica is always allowed
    to take over, however long it was cut off), and are joined by
    `redis-cli --cluster create`. `ports` fixes the client ports (their bus
    ports are then port + 10000, Redis's default); without it every client
    and bus port is a free one. The helpers ask the live nodes what they
    think now (CLUSTER NODES), never a copy kept here, so they stay right
    after a failover or a migration.
    """

    def __init__(self, folder: Path, primaries: int = 3, replicas_per_primary: int = 1,
                 ports: Sequence[int] | None = None, node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS) -> None:
        count = primaries * (1 + replicas_per_primary)
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if ports is None:
            chosen = free_ports(2 * count)
            client_ports, bus_ports = chosen[:count], chosen[count:]
        else:
            if len(ports) != count:
                raise ValueError(f"{count} ports are needed, got {len(ports)}")
            client_ports, bus_ports = list(ports), [p + 10000 for p in ports]
            if max(bus_ports) > 65535:
                raise ValueError(f"port {max(ports)} leaves no room for its cluster bus port (+10000)")
        self.folder = folder
        self.primary_count = primaries
        self.replicas_per_primary = replicas_per_primary
        self.bus_ports = bus_ports
        self._procs = [
            RedisProcess(f"redis{i + 1}", port, folder / f"redis{i + 1}", extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus),
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
                *_REPLICATION))
            for i, (port, bus) in enumerate(zip(client_ports, bus_ports, strict=True))]

    # addresses
    @property
    def procs(self) -> list[RedisProcess]:
        return list(self._procs)

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self._procs]

    @property
    def listen_ports(self) -> list[int]:
        """Client and cluster bus ports."""
        return [*self.ports, *self.bus_ports]

    @property
    def url(self) -> str:
        """The hubnode URL: `redis+cluster://` and the first nodes as seeds (any live one is enough)."""
        seeds = ",".join(p.address for p in self._procs[:self.primary_count])
        return f"redis+cluster://{seeds}"

    @property
    def seed_url(self) -> str:
        """A plain URL of one node, as a client that discovers the cluster itself (redis-py) takes it."""
        return f"redis://{self._procs[0].address}"

    # life cycle
    def phases(self) -> list[Phase]:
        what = (f"the Redis Cluster ({self.primary_count} primaries, {self.replicas_per_primary} replica each) "
                "to report cluster_state:ok on every node with every replica in sync")
        return [Phase(self._procs, self.formed, what, then=self.create)]

    def roles(self) -> dict[str, str]:
        """Each node's role by its own account now: `primary`, `replica of redisN`, or `down`."""
        mine = {p.name: self.myself(p) for p in self._procs}
        names = {me.node_id: name for name, me in mine.items() if me is not None}
        return {name: "down" if me is None else "primary" if me.primary
                else f"replica of {names.get(me.primary_id or '', '?')}" for name, me in mine.items()}

    def start(self, timeout: float = 30.0) -> Self:
        """Spawn the nodes, join them and return once formed(); on failure everything is stopped."""
        return _start(self, timeout)

    def stop(self) -> None:
        for proc in self._procs:
            proc.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def create(self) -> None:
        """`redis-cli --cluster create`: slots split evenly over the first nodes, the rest their replicas."""
        _run([find_executable("redis-cli"), "--cluster", "create", *(p.address for p in self._procs),
              "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"], "redis-cli --cluster create")

    # state
    def view(self, proc: RedisProcess) -> list[NodeLine] | None:
        """The cluster as `proc` sees it (CLUSTER NODES), or None when it does not answer."""
        text = proc.answers("CLUSTER", "NODES")
        return None if text is None else [NodeLine.parse(line) for line in str(text).splitlines() if line]

    def myself(self, proc: RedisProcess) -> NodeLine | None:
        """`proc` as it sees itself, or None when it does not answer."""
        lines = self.view(proc)
        return None if lines is None else next((n for n in lines if "myself" in n.flags), None)

    def state_ok(self, proc: RedisProcess) -> bool:
        info = proc.answers("CLUSTER", "INFO")
        return info is not None and "cluster_state:ok" in str(info)

    def answering(self) -> list[RedisProcess]:
        """The nodes that answer PING now: whoever started them (this class or deploy/cluster.py)."""
        return [p for p in self._procs if p.ping()]

    def primaries(self) -> list[RedisProcess]:
        """The answering nodes that are primaries by their own account, in node order."""
        return [p for p in self._procs if (me := self.myself(p)) is not None and me.primary]

    def replicas_of(self, primary: RedisProcess) -> list[RedisProcess]:
        """The answering nodes that call themselves a replica of `primary`."""
        head = self.myself(primary)
        if head is None:
            raise RedisTopologyError(f"{primary.name} does not answer")
        return [p for p in self._procs if (me := self.myself(p)) is not None and me.primary_id == head.node_id]

    def primary_of_slot(self, slot: int) -> RedisProcess:
        """The answering primary that serves `slot` by its own account."""
        for proc in self._procs:
            me = self.myself(proc)
            if me is not None and me.primary and slot in me.slots:
                return proc
        raise RedisTopologyError(f"no live primary serves slot {slot}")

    def formed(self) -> bool:
        """Every node answers and says cluster_state:ok; each sees all slots covered by the expected
        primaries, every other node as a replica (a primary that still takes its replica for an empty
        primary does not pass an SPUBLISH on to it) and none failing; every replica's link is up."""
        for proc in self._procs:
            lines = self.view(proc)
            if lines is None or not self.state_ok(proc) or len(lines) != len(self._procs):
                return False
            owners = [n for n in lines if n.primary]
            if len(owners) != self.primary_count or sum(len(n.slots) for n in owners) != SLOTS:
                return False
            if any(n.failed for n in lines):
                return False
        return all(proc.info("replication").get("master_link_status") == "up"
                   for proc in self._procs if not (me := self.myself(proc)) or not me.primary)

    def wait_formed(self, timeout: float = 20.0) -> None:
        wait_for(self.formed, timeout, "the Redis Cluster to be formed")

    # faults and maintenance
    def kill_primary_of_slot(self, slot: int) -> RedisProcess:
        """SIGKILL the primary serving `slot`; returns it (restart() brings it back, as a replica)."""
        proc = self.primary_of_slot(slot)
        proc.kill()
        return proc

    def wait_failover(self, slot: int, timeout: float = 15.0) -> RedisProcess:
        """Wait until a live node serves `slot` and every live node agrees and says cluster_state:ok;
        returns the new primary. After kill_primary_of_slot() that is the former replica."""
        def settled() -> RedisProcess | None:
            try:
                owner = self.primary_of_slot(slot)
            except RedisTopologyError:
                return None
            owner_id = self.myself(owner)
            for proc in self.answering():
                lines = self.view(proc)
                if owner_id is None or lines is None or not self.state_ok(proc):
                    return None
                if not any(n.node_id == owner_id.node_id and slot in n.slots for n in lines):
                    return None
            return owner

        wait_for(lambda: settled() is not None, timeout, f"a replica to take over slot {slot}")
        return self.primary_of_slot(slot)

    def migrate_slot(self, slot: int, to: RedisProcess, batch: int = 100) -> None:
        """Move `slot` and its keys to primary `to`, the way `redis-cli --cluster reshard` moves one slot:
        IMPORTING on the target, MIGRATING on the source, MIGRATE the keys in batches, then SETSLOT NODE on
        the target, the source and every other primary."""
        source = self.primary_of_slot(slot)
        if source is to:
            return
        src_id, dst_id = self._id(source), self._id(to)
        to.call("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := source.call("CLUSTER", "GETKEYSINSLOT", slot, batch):
            source.call("MIGRATE", HOST, to.port, "", 0, 5000, "KEYS", *keys)
        for proc in [to, source, *(p for p in self.primaries() if p not in (to, source))]:
            proc.call("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def uncover_slot(self, slot: int) -> RedisProcess:
        """Leave `slot` with no owner on every live node (CLUSTER DELSLOTS; a node forgets only in its own
        view, so each is told), which makes cluster_state:fail under the default
        cluster-require-full-coverage. Returns the former owner, for cover_slot()."""
        owner = self.primary_of_slot(slot)
        for proc in self.answering():
            proc.call("CLUSTER", "DELSLOTS", slot)
        return owner

    def cover_slot(self, slot: int, owner: RedisProcess) -> None:
        """Give `slot` back to `owner` (CLUSTER ADDSLOTS; the others learn it by gossip)."""
        owner.call("CLUSTER", "ADDSLOTS", slot)

    def shard_pubsub_counts(self) -> dict[str, ShardCounts]:
        """ShardCounts of every answering node, by name (INFO commandstats and stats, CLUSTER INFO).

        Compare two snapshots: a message to a shard channel shows up on its
        primary and that primary's replicas only; one to a plain channel on
        every node.
        """
        counts: dict[str, ShardCounts] = {}
        for proc in self.answering():
            commands, stats = proc.info("commandstats"), proc.info("stats")
            bus = dict(line.split(":", 1) for line in str(proc.call("CLUSTER", "INFO")).split() if ":" in line)
            counts[proc.name] = ShardCounts(
                spublish=int(commands.get("cmdstat_spublish", {}).get("calls", 0)),
                publish=int(commands.get("cmdstat_publish", {}).get("calls", 0)),
                bus_publish=int(bus.get("cluster_stats_messages_publish_received", 0)),
                bus_publishshard=int(bus.get("cluster_stats_messages_publishshard_received", 0)),
                shard_channels=int(stats.get("pubsubshard_channels", 0)))
        return counts

    def _id(self, proc: RedisProcess) -> str:
        return str(proc.call("CLUSTER", "MYID"))


# -- Sentinel ----------------------------------------------------------------------------

class SentinelProcs:
    """A primary (`redis1`), its replica (`redis2`, `--replicaof`) and three sentinels watching them.

    The sentinels (quorum 2) declare the primary down after 1 s without an
    answer and fail over to the replica. `ports` fixes the two data ports
    and `sentinel_ports` the three sentinels'; without them free ports are
    used. `primary` and `replica` are the roles as of start() or the last
    wait_failover(), which swaps them once the sentinels have.
    """

    def __init__(self, folder: Path, master_name: str = "hubmaster", ports: Sequence[int] | None = None,
                 sentinel_ports: Sequence[int] | None = None) -> None:
        data_ports = list(ports) if ports is not None else free_ports(2)
        watch_ports = list(sentinel_ports) if sentinel_ports is not None else free_ports(3)
        if len(data_ports) != 2 or len(watch_ports) != 3:
            raise ValueError("a Sentinel setup here is 2 data ports and 3 sentinel ports")
        self.folder = folder
        self.master_name = master_name
        first = RedisProcess("redis1", data_ports[0], folder / "redis1", extra=_REPLICATION)
        second = RedisProcess("redis2", data_ports[1], folder / "redis2",
                              extra=(*_REPLICATION, "--replicaof", HOST, str(data_ports[0])))
        self.data = [first, second]
        self.primary, self.replica = first, second
        conf = (f"sentinel resolve-hostnames no\n"
                f"sentinel monitor {master_name} {HOST} {first.port} 2\n"
                f"sentinel down-after-milliseconds {master_name} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {master_name} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {master_name} 1\n")
        self.sentinels = [RedisProcess(f"sentinel{i + 1}", port, folder / f"sentinel{i + 1}", sentinel_conf=conf)
                          for i, port in enumerate(watch_ports)]

    @property
    def procs(self) -> list[RedisProcess]:
        return [*self.data, *self.sentinels]

    @property
    def sentinel_ports(self) -> list[int]:
        return [s.port for s in self.sentinels]

    @property
    def listen_ports(self) -> list[int]:
        return [p.port for p in self.procs]

    @property
    def url(self) -> str:
        """The hubnode URL: `redis+sentinel://` with every sentinel, then the monitored name."""
        return f"redis+sentinel://{','.join(s.address for s in self.sentinels)}/{self.master_name}"

    def phases(self) -> list[Phase]:
        """The replica must be in sync before the sentinels start: a sentinel finds replicas in the
        primary's INFO, which it reads on connecting and then only every 10 s."""
        return [Phase(self.data, self.replicating, "the replica to be in sync with the primary"),
                Phase(self.sentinels, self.watching,
                      "the sentinels to agree on the primary, see its replica and know each other")]

    def roles(self) -> dict[str, str]:
        """The roles as of start() or the last wait_failover()."""
        return {self.primary.name: "primary", self.replica.name: f"replica of {self.primary.name}",
                **{s.name: f"sentinel of {self.master_name}" for s in self.sentinels}}

    def start(self, timeout: float = 30.0) -> Self:
        return _start(self, timeout)

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.data]:  # sentinels first: no failover while the data stops
            proc.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # state
    def replicating(self) -> bool:
        """`replica` reports its link to `primary` up."""
        try:
            info = self.replica.info("replication")
        except (redis.RedisError, OSError):
            return False
        return info.get("master_link_status") == "up" and int(info.get("master_port", 0)) == self.primary.port

    def named_primary(self, sentinel: RedisProcess) -> int | None:
        """The port `sentinel` names as the primary, or None when it does not answer."""
        reply = sentinel.answers("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(reply[1]) if reply else None

    def watching(self) -> bool:
        """Every sentinel names `primary`, sees `replica` healthy and knows the other two sentinels."""
        for sentinel in self.sentinels:
            if self.named_primary(sentinel) != self.primary.port:
                return False
            replicas = sentinel.answers("SENTINEL", "REPLICAS", self.master_name) or []
            if not any(_pairs(r).get("port") == str(self.replica.port) and _pairs(r).get("flags") == "slave"
                       and _pairs(r).get("master-link-status") == "ok" for r in replicas):
                return False
            if len(sentinel.answers("SENTINEL", "SENTINELS", self.master_name) or []) != len(self.sentinels) - 1:
                return False
        return True

    # faults
    def kill_primary(self) -> RedisProcess:
        """SIGKILL the primary; returns it."""
        self.primary.kill()
        return self.primary

    def wait_failover(self, timeout: float = 20.0) -> RedisProcess:
        """Wait until every answering sentinel names the former replica and it says role:master; then swap
        `primary` and `replica` and return the new primary."""
        candidate = self.replica

        def promoted() -> bool:
            named = [p for s in self.sentinels if (p := self.named_primary(s)) is not None]
            role = candidate.answers("ROLE")
            return bool(named) and all(p == candidate.port for p in named) and bool(role) and role[0] == "master"

        wait_for(promoted, timeout, f"the sentinels to promote {candidate.name}")
        self.primary, self.replica = candidate, self.primary
        return candidate


_T = TypeVar("_T", bound=Topology)


def _pairs(reply: Any) -> dict[str, str]:
    """A map reply as a dict: redis-py gives a dict for some commands, a flat [k, v, k, v...] for others."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(reply[i]): str(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}


def _start(topology: _T, timeout: float) -> _T:
    """Run `topology`'s phases with RedisProcess.spawn; stop everything it started if one fails."""
    end = time.monotonic() + timeout
    try:
        for phase in topology.phases():
            for proc in phase.procs:
                proc.spawn()
            for proc in phase.procs:
                wait_for(proc.ping, end - time.monotonic(), f"{proc.name} to answer PING", proc.check_alive)
            if phase.then is not None:
                phase.then()
            wait_for(phase.ready, end - time.monotonic(), phase.what, functools.partial(_check, phase.procs))
    except BaseException:
        for proc in reversed(topology.procs):
            proc.stop()
        raise
    return topology


def _check(procs: Sequence[RedisProcess]) -> None:
    for proc in procs:
        proc.check_alive()

